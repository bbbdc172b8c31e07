//! A TCP proxy on loopback that a test can take away and bring back: [`TcpProxy::pause`] closes
//! every proxied connection and the listening socket (new connections are refused), and
//! [`TcpProxy::resume`] listens again on the same port. Used to put a chain outage between
//! chainsync-svc and the devnet node's websocket.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Default)]
struct Tasks {
    accept: Option<JoinHandle<()>>,
    conns: Vec<JoinHandle<()>>,
}

/// A proxy from `127.0.0.1:<port>` to `upstream`. Dropping it closes everything.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    tasks: Arc<Mutex<Tasks>>,
    accepted: Arc<AtomicU64>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let p = TcpProxy {
            addr: listener.local_addr()?,
            upstream,
            tasks: Arc::new(Mutex::new(Tasks::default())),
            accepted: Arc::new(AtomicU64::new(0)),
        };
        p.serve(listener);
        Ok(p)
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:<port>` (for a websocket upstream).
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Connections accepted so far (over all pauses).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Whether the proxy is listening.
    pub fn is_up(&self) -> bool {
        self.lock().accept.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serve(&self, listener: TcpListener) {
        let (tasks, accepted, upstream) =
            (self.tasks.clone(), self.accepted.clone(), self.upstream);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let conn = tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return; // dropping `down` closes it
                    };
                    let mut down = down;
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                });
                let mut t = tasks.lock().unwrap_or_else(|p| p.into_inner());
                t.conns.retain(|c| !c.is_finished());
                t.conns.push(conn);
            }
        });
        self.lock().accept = Some(accept);
    }

    /// Closes every proxied connection and the listening socket; connecting is refused until
    /// [`TcpProxy::resume`]. Returns once all of them are closed.
    pub async fn pause(&self) {
        // The accept loop first (it adds connections), then the connections.
        let accept = self.lock().accept.take();
        if let Some(a) = accept {
            a.abort();
            let _ = a.await;
        }
        let conns = std::mem::take(&mut self.lock().conns);
        for c in conns {
            c.abort();
            let _ = c.await;
        }
    }

    /// Listens again on the same port (retrying for a few seconds while the port is in use).
    pub async fn resume(&self) -> std::io::Result<()> {
        if self.is_up() {
            return Ok(());
        }
        let start = Instant::now();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.serve(listener);
        Ok(())
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        let mut t = self.lock();
        if let Some(a) = t.accept.take() {
            a.abort();
        }
        for c in t.conns.drain(..) {
            c.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server, the proxy in front of it: bytes pass both ways; a pause closes the open
    /// connection and refuses new ones; after resume the same address works again.
    #[tokio::test]
    async fn pipes_both_ways_drops_on_pause_and_comes_back() {
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = TcpProxy::start(echo_addr).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        proxy.pause().await;
        assert!(!proxy.is_up());
        // The open connection is closed: a read ends (EOF or reset).
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the paused proxy closes the connection");
        assert!(n.as_ref().map(|n| *n == 0).unwrap_or(true), "{n:?}");
        let refused = TcpStream::connect(proxy.addr()).await;
        assert!(refused.is_err(), "connecting is refused while paused");

        proxy.resume().await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"again").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");
        assert_eq!(proxy.accepted(), 2);
    }
}
