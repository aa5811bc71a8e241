//! `batchd health`: asks a batchd's gRPC health service whether it is SERVING; what the
//! Helm chart's `helm test` pod runs.

use std::process::ExitCode;

use anyhow::Context;
use tonic::transport::Channel;

use crate::config::HealthArgs;

/// Runs `batchd health`: exit 0 when the service is SERVING.
pub async fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let channel = Channel::from_shared(args.server.clone())
        .with_context(|| format!("`{}` is not a server address", args.server))?
        .connect_timeout(args.timeout)
        .timeout(args.timeout)
        .connect()
        .await
        .with_context(|| format!("cannot reach {}", args.server))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .with_context(|| format!("health check of {} failed", args.server))?
        .into_inner()
        .status();
    println!(
        "{} {:?}: {}",
        args.server,
        args.service,
        status.as_str_name()
    );
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
