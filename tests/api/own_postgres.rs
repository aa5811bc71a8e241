//! PostgreSQL servers of a test's (or a benchmark's) own, never the shared one: a
//! primary made with `initdb` in a temporary directory on a free port, with or without
//! a synchronous streaming standby (`pg_basebackup -R`), driven with `pg_ctl`, as the
//! `postgres` user when running as root. Self-contained, so the benchmark harness
//! includes this file too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The directory of PostgreSQL's server programs (`initdb`, `pg_ctl`, ...): the newest
/// of Debian's `/usr/lib/postgresql/<version>/bin`, or where `pg_config` says.
fn server_programs() -> PathBuf {
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .max();
    debian.unwrap_or_else(|| {
        let output = std::process::Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("PostgreSQL's server programs (initdb, pg_ctl) are installed");
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    })
}

/// A free port on the loopback interface.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// PostgreSQL servers of the test's own: a primary, with or without a synchronous
/// standby, stopped when dropped.
pub struct OwnPostgres {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    pub primary: u16,
    /// The standby's port (free, and unused without a standby).
    pub standby: u16,
}

impl OwnPostgres {
    /// `program` of the server programs with `args`, as the `postgres` user when the
    /// tests run as root (PostgreSQL refuses to run as root); fails the test on error.
    pub fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut command = if unsafe { libc::geteuid() } == 0 {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            std::process::Command::new(&program)
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("run {program:?}: {e}"));
        assert!(
            output.status.success(),
            "{program:?} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    /// Makes, configures and starts a primary (`primary_settings` added to its
    /// configuration) and no standby.
    pub fn start_primary(primary_settings: &str) -> OwnPostgres {
        let dir = tempfile::Builder::new()
            .prefix("batchd-failover-")
            .tempdir()
            .unwrap();
        if unsafe { libc::geteuid() } == 0 {
            let owned = std::process::Command::new("chown")
                .args(["postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(owned.success(), "chown the cluster directory to postgres");
        }
        let cluster = OwnPostgres {
            dir,
            bin: server_programs(),
            primary: free_port(),
            standby: free_port(),
        };
        let primary = cluster.path("primary");
        cluster.run(
            "initdb",
            &["-D", &primary, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        let socket_dir = cluster.dir.path().to_string_lossy().into_owned();
        append(
            &Path::new(&primary).join("postgresql.conf"),
            &format!(
                "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{socket_dir}'\n\
                 wal_level = replica\nmax_wal_senders = 4\n\
                 fsync = on\nsynchronous_commit = on\n{primary_settings}",
                cluster.primary
            ),
        );
        append(
            &Path::new(&primary).join("pg_hba.conf"),
            "host replication all 127.0.0.1/32 trust\n",
        );
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                &primary,
                "-l",
                &cluster.path("primary.log"),
                "-w",
                "start",
            ],
        );
        cluster
    }

    /// Makes, configures and starts both servers, and waits until the standby is
    /// synchronous.
    pub async fn start() -> OwnPostgres {
        let cluster = OwnPostgres::start_primary("synchronous_standby_names = '*'\n");
        let standby = cluster.path("standby");
        let primary_port = cluster.primary.to_string();
        cluster.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port,
                "-U",
                "postgres",
                "-D",
                &standby,
                "-R",
                "-X",
                "stream",
            ],
        );
        // The standby's own port, after the primary's copied settings; and once promoted
        // it has no standby of its own to wait for (a failover manager, Patroni or
        // CloudNativePG, sets this on promotion; a promoted server that still names a
        // synchronous standby would hold every commit).
        append(
            &Path::new(&standby).join("postgresql.conf"),
            &format!(
                "port = {}\nsynchronous_standby_names = ''\n",
                cluster.standby
            ),
        );
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                &standby,
                "-l",
                &cluster.path("standby.log"),
                "-w",
                "start",
            ],
        );
        let admin = sqlx::PgPool::connect(&cluster.url(cluster.primary))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let state =
                sqlx::query_scalar::<_, String>("SELECT sync_state FROM pg_stat_replication")
                    .fetch_optional(&admin)
                    .await;
            if matches!(state.as_ref().map(|s| s.as_deref()), Ok(Some("sync"))) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no synchronous standby within 30 s: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        admin.close().await;
        cluster
    }

    pub fn url(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    pub fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        for node in ["primary", "standby"] {
            let data = self.path(node);
            if Path::new(&data).join("postmaster.pid").exists() {
                // Best effort: a failed stop must not hide the test's own failure.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"])
                }));
            }
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}
