//! The TCP stream under the SSH session, tuned so small request/reply exchanges do not stall.
//!
//! sshd leaves Nagle's algorithm on until a session's command starts (seen in an strace of
//! OpenSSH 9.2's sshd). Right after authentication it announces its host keys in a message that
//! needs no reply, so Linux delays the client's ACK by up to 40 ms, and sshd's reply to the next
//! channel request waits behind that ACK. The deploy's first command started 41 to 47 ms late on
//! loopback. Acknowledging every segment as it arrives removes that wait, at the cost of one
//! `setsockopt` per read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream that acknowledges received data at once (`TCP_QUICKACK`) on Linux.
pub struct AckingStream {
    inner: TcpStream,
}

impl AckingStream {
    pub fn new(inner: TcpStream) -> AckingStream {
        AckingStream { inner }
    }

    /// Linux leaves quick-ACK mode on its own after a while, so this is set again after each read.
    fn acknowledge_now(&self) {
        #[cfg(target_os = "linux")]
        {
            let _ = socket2::SockRef::from(&self.inner).set_tcp_quickack(true);
        }
    }
}

impl AsyncRead for AckingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let filled = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > filled {
            this.acknowledge_now();
        }
        poll
    }
}

impl AsyncWrite for AckingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
