//! Newline-delimited framing for a stdio MCP server's stdout.
//!
//! Each line is one JSON-RPC message (the stdio transport forbids embedded
//! newlines). Lines are bounded: an overlong line is skipped whole and
//! reported, rather than growing memory without limit. Blank lines are
//! skipped and a trailing `\r` is dropped.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// One unit read from the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Message(String),
    /// A line longer than the limit was skipped: this many bytes, of which
    /// the first [`HEAD_BYTES`] are kept (enough to find a response's id).
    TooLong {
        bytes: usize,
        head: Vec<u8>,
    },
    /// A line that is not UTF-8 was skipped.
    NotUtf8,
}

/// How much of an overlong line is kept.
pub const HEAD_BYTES: usize = 4096;

/// Reads bounded lines.
pub struct LineReader<R> {
    reader: BufReader<R>,
    max: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        Self { reader: BufReader::with_capacity(64 * 1024, inner), max }
    }

    /// The next line, or `None` at the end of the stream.
    pub async fn next(&mut self) -> io::Result<Option<Line>> {
        loop {
            let mut line = Vec::new();
            let mut dropped = 0usize;
            let mut head = Vec::new();
            let mut ended = false;
            loop {
                let available = self.reader.fill_buf().await?;
                if available.is_empty() {
                    ended = true;
                    break;
                }
                let (chunk, consumed, complete) = match available.iter().position(|&b| b == b'\n') {
                    Some(i) => (&available[..i], i + 1, true),
                    None => (available, available.len(), false),
                };
                if dropped == 0 && line.len() + chunk.len() <= self.max {
                    line.extend_from_slice(chunk);
                } else {
                    if dropped == 0 {
                        dropped = line.len();
                        head = std::mem::take(&mut line);
                        head.truncate(HEAD_BYTES);
                        let room = HEAD_BYTES - head.len();
                        head.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    dropped += chunk.len();
                }
                self.reader.consume(consumed);
                if complete {
                    break;
                }
            }
            if dropped > 0 {
                return Ok(Some(Line::TooLong { bytes: dropped, head }));
            }
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                if ended {
                    return Ok(None);
                }
                continue;
            }
            return Ok(Some(match String::from_utf8(line) {
                Ok(text) => Line::Message(text),
                Err(_) => Line::NotUtf8,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(input: &[u8], max: usize) -> Vec<Line> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(line) = reader.next().await.unwrap() {
            out.push(line);
        }
        out
    }

    #[tokio::test]
    async fn splits_on_newlines_and_skips_blank_lines() {
        let lines = read_all(b"{\"a\":1}\n\n  \r\n{\"b\":2}\r\n{\"c\":3}", 100).await;
        assert_eq!(
            lines,
            [Line::Message("{\"a\":1}".into()), Line::Message("{\"b\":2}".into()), Line::Message("{\"c\":3}".into())]
        );
    }

    #[tokio::test]
    async fn overlong_lines_are_dropped_whole_and_reading_goes_on() {
        let mut input = vec![b'x'; 200_000];
        input.extend_from_slice(b"\nok\n");
        let lines = read_all(&input, 1000).await;
        assert_eq!(lines, [Line::TooLong { bytes: 200_000, head: vec![b'x'; HEAD_BYTES] }, Line::Message("ok".into())]);
    }

    #[tokio::test]
    async fn invalid_utf8_is_reported() {
        assert_eq!(read_all(b"\xff\xfe\nok\n", 100).await, [Line::NotUtf8, Line::Message("ok".into())]);
    }
}
