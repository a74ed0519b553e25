//! The executor's stdin, which says when it ends.
//!
//! A stdio MCP server is asked to leave by closing its stdin. rmcp then lets
//! calls still running finish for up to 5 s before it returns, longer than the
//! runner's `RUNNER_STOP_GRACE`; the runner would kill the executor first, and
//! the executor would never kill what its calls were running. Noticing the end
//! of input here lets the executor kill its commands at once, so the calls
//! end, rmcp returns, and the executor exits within the grace.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::oneshot;

/// A reader that fires `ended` the first time it reports end of input (or an
/// error, which ends rmcp's input just the same).
pub struct NotifyEof<R> {
    inner: R,
    ended: Option<oneshot::Sender<()>>,
}

impl<R> NotifyEof<R> {
    pub fn new(inner: R) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (NotifyEof { inner, ended: Some(tx) }, rx)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for NotifyEof<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let ended = match &poll {
            // Nothing read into a buffer with room is the end of input.
            Poll::Ready(Ok(())) => buf.filled().len() == before && buf.remaining() > 0,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        };
        if ended && let Some(tx) = this.ended.take() {
            let _ = tx.send(());
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn fires_at_the_end_and_not_before() {
        let (mut writer, reader) = tokio::io::duplex(64);
        let (mut reader, mut ended) = NotifyEof::new(reader);
        writer.write_all(b"line\n").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(reader.read(&mut buf).await.unwrap(), 5);
        assert!(ended.try_recv().is_err(), "fired before the end");
        drop(writer);
        assert_eq!(reader.read(&mut buf).await.unwrap(), 0);
        ended.await.expect("fired at the end");
    }

    #[tokio::test]
    async fn an_empty_buffer_is_not_the_end() {
        let (mut writer, reader) = tokio::io::duplex(64);
        let (mut reader, mut ended) = NotifyEof::new(reader);
        writer.write_all(b"x").await.unwrap();
        assert_eq!(reader.read(&mut []).await.unwrap(), 0);
        assert!(ended.try_recv().is_err());
    }
}
