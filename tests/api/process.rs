//! `batchd` as a real process: one-shot subcommands and `serve` on random ports.

use std::process::Stdio;
use std::time::Duration;

use batchd::proto::batchd::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::helpers::{Bearer, Client, Worker};

/// The `batchd` binary with `args`, on `database_url`, logging warnings only.
pub fn batchd(args: &[&str], database_url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_batchd"));
    command
        .args(args)
        .env("BATCHD_DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    command
}

/// `batchd <global> serve` on random ports of 127.0.0.1, over `database_url`; serve's
/// own flags can be appended.
pub fn serve_on_random_ports(database_url: &str, global: &[&str]) -> Command {
    let mut args = global.to_vec();
    args.extend([
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    batchd(&args, database_url)
}

/// Runs a one-shot subcommand; returns (exit code, stdout, stderr).
pub async fn run(args: &[&str], database_url: &str) -> (i32, String, String) {
    let output = batchd(args, database_url)
        .output()
        .await
        .expect("run batchd");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// A `batchd serve` process on random ports.
pub struct Server {
    /// The process (killed when dropped).
    pub child: Child,
    /// Its stdout up to the "serving" line.
    pub stdout: Vec<String>,
    /// Where gRPC listens.
    pub grpc_addr: String,
    /// Where HTTP listens.
    pub http_addr: String,
}

impl Server {
    /// Starts `batchd serve` with `extra` flags and waits until it serves.
    pub async fn start(database_url: &str, extra: &[&str]) -> Server {
        let mut command = serve_on_random_ports(database_url, &[]);
        command.args(extra);
        Self::spawn(command).await
    }

    /// Spawns a prepared `batchd serve` command and waits until it serves.
    pub async fn spawn(mut command: Command) -> Server {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn batchd serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = Vec::new();
        let (grpc_addr, http_addr) = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                stdout.push(line.clone());
                if let Some(rest) = line.strip_prefix("batchd is serving gRPC on ") {
                    let (grpc, http) = rest.split_once(" and HTTP on ").unwrap();
                    return (grpc.to_owned(), http.to_owned());
                }
            }
            panic!("batchd exited before serving: {stdout:?}");
        })
        .await
        .expect("batchd serves within 30 s");
        Server {
            child,
            stdout,
            grpc_addr,
            http_addr,
        }
    }

    /// The admin key printed at the first start on an empty database.
    pub fn first_key(&self) -> String {
        self.stdout
            .iter()
            .find(|line| line.starts_with("bd_sk_"))
            .expect("a first key was printed")
            .clone()
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A batch API client sending `key`.
    pub async fn client(&self, key: &str) -> Client {
        pb::batch_service_client::BatchServiceClient::with_interceptor(
            self.channel().await,
            Bearer(Some(key.into())),
        )
    }

    /// A worker API client sending `key`.
    pub async fn worker(&self, key: &str) -> Worker {
        pb::batch_worker_service_client::BatchWorkerServiceClient::with_interceptor(
            self.channel().await,
            Bearer(Some(key.into())),
        )
    }

    /// Sends SIGTERM (a clean stop) or SIGKILL (a crash).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    }
}
