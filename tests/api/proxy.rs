//! A TCP proxy a test puts between batchd and PostgreSQL, to make the database sick
//! without touching the shared server: frozen (connections stay open, nothing is
//! forwarded: a network partition), slow (every chunk delayed), or healthy again; and
//! moved to another server, as a service name moves to a new primary on failover.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How the proxy forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Everything passes at once.
    Forward,
    /// Nothing passes; connections stay open and new ones are accepted.
    Frozen,
    /// Every chunk waits this long before it passes.
    Delayed(Duration),
}

/// A running proxy; it stops accepting when dropped (open connections end with it).
pub struct TcpProxy {
    addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    target: Arc<watch::Sender<SocketAddr>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a random local port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let mode = Arc::new(watch::channel(Mode::Forward).0);
        let modes = mode.clone();
        let target = Arc::new(watch::channel(target).0);
        let targets = target.subscribe();
        let acceptor = tokio::spawn(async move {
            let mut pumps = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let to = *targets.borrow();
                let Ok(server) = TcpStream::connect(to).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                pumps.spawn(pump(client_read, server_write, modes.subscribe()));
                pumps.spawn(pump(server_read, client_write, modes.subscribe()));
            }
        });
        TcpProxy {
            addr,
            mode,
            target,
            acceptor,
        }
    }

    /// The PostgreSQL server of `url` replaced by this proxy.
    pub fn postgres_url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let (credentials, rest) = match rest.split_once('@') {
            Some((credentials, rest)) => (format!("{credentials}@"), rest),
            None => (String::new(), rest),
        };
        let path = rest.find('/').map_or("", |slash| &rest[slash..]);
        format!("{scheme}://{credentials}{}{path}", self.addr)
    }

    /// Sends new connections to `target` from now on; open ones stay where they are.
    pub fn retarget(&self, target: SocketAddr) {
        self.target.send_replace(target);
    }

    /// Switches how the proxy forwards, for every connection at once.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// Copies `from` to `to` chunk by chunk, each chunk waiting for the mode to let it pass.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // Frozen: read nothing either, so the peer's data waits in the kernel buffers.
        let Ok(current) = mode.wait_for(|m| *m != Mode::Frozen).await.map(|m| *m) else {
            return;
        };
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if let Mode::Delayed(delay) = current {
            tokio::time::sleep(delay).await;
        }
        if mode.wait_for(|m| *m != Mode::Frozen).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
