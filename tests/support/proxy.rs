//! A loopback TCP proxy for tests that cut a client's connection to a test host mid-step.
//!
//! The proxy forwards every connection it accepts to one target. It can limit the bytes per second
//! in each direction, so that an upload lasts long enough to be interrupted, and it can shut down
//! every forwarded connection at once, as a dropped network would.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often the accept loop checks whether the proxy was dropped.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// Size of one read while forwarding.
const BUFFER_SIZE: usize = 16 * 1024;

/// A running proxy. Dropping it stops accepting and cuts the connections that are still open.
pub struct TcpProxy {
    address: SocketAddr,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    forwarded_bytes: Arc<AtomicU64>,
    stopped: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Listens on a free port of `listen_address` and forwards each connection to `target`.
    /// `bytes_per_second` limits each direction of each connection when set.
    pub fn start(
        listen_address: Ipv4Addr,
        target: SocketAddr,
        bytes_per_second: Option<u64>,
    ) -> TcpProxy {
        let listener = TcpListener::bind((listen_address, 0))
            .unwrap_or_else(|error| panic!("failed to bind a proxy on {listen_address}: {error}"));
        let address = listener
            .local_addr()
            .expect("a bound listener has an address");
        listener
            .set_nonblocking(true)
            .expect("failed to make the proxy listener non-blocking");

        let sockets = Arc::new(Mutex::new(Vec::new()));
        let forwarded_bytes = Arc::new(AtomicU64::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let accept_thread = {
            let sockets = sockets.clone();
            let forwarded_bytes = forwarded_bytes.clone();
            let stopped = stopped.clone();
            thread::spawn(move || {
                accept_loop(
                    listener,
                    target,
                    bytes_per_second,
                    sockets,
                    forwarded_bytes,
                    stopped,
                )
            })
        };
        TcpProxy {
            address,
            sockets,
            forwarded_bytes,
            stopped,
            accept_thread: Some(accept_thread),
        }
    }

    /// Returns the address clients connect to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns how many bytes the proxy forwarded so far, both directions together.
    pub fn forwarded_bytes(&self) -> u64 {
        self.forwarded_bytes.load(Ordering::SeqCst)
    }

    /// Shuts down both sides of every open connection, so the client and sshd each see the
    /// connection end in the middle of whatever they were sending. Returns how many sockets
    /// were shut down.
    pub fn cut_all(&self) -> usize {
        let mut sockets = self.sockets.lock().expect("proxy socket list poisoned");
        let count = sockets.len();
        for socket in sockets.drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
        count
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.cut_all();
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    bytes_per_second: Option<u64>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    forwarded_bytes: Arc<AtomicU64>,
    stopped: Arc<AtomicBool>,
) {
    while !stopped.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(error) => {
                eprintln!("proxy: accept failed: {error}");
                thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
            eprintln!("proxy: failed to connect to {target}; closing the client connection");
            continue;
        };
        // Accepted sockets may inherit non-blocking mode from the listener on some platforms.
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);

        let clones = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        );
        let (Ok(client_reader), Ok(server_reader), Ok(client_handle), Ok(server_handle)) = clones
        else {
            eprintln!("proxy: failed to clone a socket; closing the connection");
            continue;
        };
        sockets
            .lock()
            .expect("proxy socket list poisoned")
            .extend([client_handle, server_handle]);

        let upstream_counter = forwarded_bytes.clone();
        let downstream_counter = forwarded_bytes.clone();
        thread::spawn(move || forward(client_reader, server, bytes_per_second, upstream_counter));
        thread::spawn(move || forward(server_reader, client, bytes_per_second, downstream_counter));
    }
}

/// Copies `from` into `to` until `from` ends or either side fails, then passes the end on.
/// The loop ends when a read returns 0 or an error, which `cut_all` causes at the latest.
fn forward(
    mut from: TcpStream,
    mut to: TcpStream,
    bytes_per_second: Option<u64>,
    counter: Arc<AtomicU64>,
) {
    let started = Instant::now();
    let mut sent = 0u64;
    let mut buffer = vec![0u8; BUFFER_SIZE];
    loop {
        let count = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => count,
        };
        if to.write_all(&buffer[..count]).is_err() {
            break;
        }
        sent += count as u64;
        counter.fetch_add(count as u64, Ordering::SeqCst);
        if let Some(rate) = bytes_per_second {
            // Sleep until the bytes sent so far fit the rate.
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                thread::sleep(wait);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
