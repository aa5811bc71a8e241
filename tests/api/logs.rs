//! Logs: the structured (JSON) log format.

use crate::helpers::*;

/// `--log-format json` writes one JSON object per line.
#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let db = TestDb::fresh(Backend::Sqlite).await;
    let mut command = crate::process::serve_on_random_ports(&db.url, &["--log-format", "json"]);
    command
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped());
    let server = crate::process::Server::spawn(command).await;
    server.signal("TERM");
    let output = server.child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 2, "{stderr}");
    for line in &lines {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            entry["timestamp"].is_string() && entry["level"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"message\":\"batchd is serving\"")),
        "{stderr}"
    );
}
