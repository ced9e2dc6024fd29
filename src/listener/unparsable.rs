//! The JSON body for hyper's own answer to a request it cannot parse.
//!
//! When a request's head is not valid HTTP/1.1 (a malformed, negative or
//! duplicated `Content-Length`, a bad request line) or is too large, hyper
//! answers it itself — 400, 414 or 431 — with an empty body, before any route
//! runs, and then closes the connection; it has no hook to shape that answer.
//! Every other Warren error carries `{"code","message"}`, so [`ErrorBodies`]
//! sits between hyper and the socket and gives that answer the same body.
//!
//! It recognises hyper's answer exactly: the last thing hyper writes on the
//! connection, a bare head with one of those three statuses and
//! `content-length: 0`. Warren's own error replies always have a body, so
//! nothing else matches; everything else passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{ErrorBody, ErrorCode};

/// A connection whose writes pass through, except hyper's bodiless answer to
/// an unparsable request, which leaves with a JSON error body. `refused` is
/// told the code of each such answer (for the error counters).
pub struct ErrorBodies<S, F> {
    inner: S,
    refused: F,
    /// A rewritten answer partly written: its bytes, how many are out, and
    /// how many of hyper's bytes it stands for.
    pending: Option<Pending>,
}

struct Pending {
    bytes: Vec<u8>,
    written: usize,
    replaces: usize,
}

impl<S, F> ErrorBodies<S, F> {
    pub fn new(inner: S, refused: F) -> Self {
        Self {
            inner,
            refused,
            pending: None,
        }
    }
}

/// Where in a write hyper's bodiless answer starts, and what it refuses.
fn automatic_answer(buf: &[u8]) -> Option<(usize, ErrorCode)> {
    if !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let at = buf.windows(7).rposition(|w| w == b"HTTP/1.")?;
    let head = &buf[at..];
    // The head is the whole tail: no blank line before its end.
    if head[..head.len() - 2].windows(4).any(|w| w == b"\r\n\r\n") {
        return None;
    }
    let code = match head.get(9..13)? {
        b"400 " => ErrorCode::InvalidRequest,
        b"414 " => ErrorCode::UriTooLong,
        b"431 " => ErrorCode::HeadersTooLarge,
        _ => return None,
    };
    let bodiless = head
        .split(|&b| b == b'\n')
        .any(|line| line.eq_ignore_ascii_case(b"content-length: 0\r"));
    bodiless.then_some((at, code))
}

/// The answer Warren gives instead: same status, the JSON body, and a close
/// (hyper closes the connection after its answer).
fn answer(code: ErrorCode) -> Vec<u8> {
    let message = match code {
        ErrorCode::UriTooLong => "the request line is too long",
        ErrorCode::HeadersTooLarge => "the request's headers are too large",
        _ => "the request is not valid HTTP/1.1 (check its request line and Content-Length)",
    };
    let body = serde_json::to_vec(&ErrorBody {
        code,
        message: message.to_owned(),
        retry_after_ms: None,
    })
    .expect("an error body serialises");
    let status = code.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

impl<S: AsyncRead + Unpin, F: Unpin> AsyncRead for ErrorBodies<S, F> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, F: Fn(ErrorCode) + Unpin> AsyncWrite for ErrorBodies<S, F> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_none() {
            match automatic_answer(buf) {
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
                // What comes before it (a pipelined response) goes out first.
                Some((at, _)) if at > 0 => {
                    return Pin::new(&mut this.inner).poll_write(cx, &buf[..at]);
                }
                Some((_, code)) => {
                    (this.refused)(code);
                    this.pending = Some(Pending {
                        bytes: answer(code),
                        written: 0,
                        replaces: buf.len(),
                    });
                }
            }
        }
        let pending = this.pending.as_mut().expect("set above");
        while pending.written < pending.bytes.len() {
            match ready!(
                Pin::new(&mut this.inner).poll_write(cx, &pending.bytes[pending.written..])
            ) {
                Ok(0) => {
                    this.pending = None;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => pending.written += n,
                Err(e) => {
                    this.pending = None;
                    return Poll::Ready(Err(e));
                }
            }
        }
        let replaces = pending.replaces;
        this.pending = None;
        Poll::Ready(Ok(replaces))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    const HYPER_400: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 08:00:00 GMT\r\n\r\n";

    /// A socket that takes at most `chunk` bytes per write.
    struct Trickle {
        out: Vec<u8>,
        chunk: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = buf.len().min(this.chunk);
            this.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Write `writes` through the wrapper onto a socket taking `chunk` bytes
    /// at a time; what reached the socket, and the codes reported.
    async fn through(writes: &[&[u8]], chunk: usize) -> (Vec<u8>, Vec<ErrorCode>) {
        let codes = Arc::new(Mutex::new(Vec::new()));
        let seen = codes.clone();
        let mut io = ErrorBodies::new(
            Trickle {
                out: Vec::new(),
                chunk,
            },
            move |code| seen.lock().unwrap().push(code),
        );
        for write in writes {
            io.write_all(write).await.unwrap();
        }
        let codes = codes.lock().unwrap().clone();
        (io.inner.out, codes)
    }

    fn split(answer: &[u8]) -> (String, serde_json::Value) {
        let text = String::from_utf8(answer.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), serde_json::from_str(body).unwrap())
    }

    #[tokio::test]
    async fn hypers_bodiless_400_gets_the_json_error_body() {
        let (out, codes) = through(&[HYPER_400], usize::MAX).await;
        let (head, body) = split(&out);
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let declared: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(declared, serde_json::to_vec(&body).unwrap().len());
        assert_eq!(body["code"], "invalid_request");
        assert!(body["message"].is_string());
        assert_eq!(codes, vec![ErrorCode::InvalidRequest]);
    }

    #[tokio::test]
    async fn too_large_heads_keep_their_status_with_their_own_code() {
        for (status, code) in [
            ("414 URI Too Long", "uri_too_long"),
            ("431 Request Header Fields Too Large", "headers_too_large"),
        ] {
            let hyper = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            let (out, _) = through(&[hyper.as_bytes()], usize::MAX).await;
            let (head, body) = split(&out);
            assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
            assert_eq!(body["code"], code);
        }
    }

    #[tokio::test]
    async fn a_slow_socket_still_gets_the_whole_answer() {
        let (whole, _) = through(&[HYPER_400], usize::MAX).await;
        let (trickled, codes) = through(&[HYPER_400], 7).await;
        assert_eq!(trickled, whole);
        assert_eq!(codes.len(), 1, "one answer, counted once");
    }

    #[tokio::test]
    async fn a_pipelined_response_before_it_goes_out_unchanged() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let both = [&ok[..], HYPER_400].concat();
        let (out, _) = through(&[&both], usize::MAX).await;
        assert!(out.starts_with(ok));
        let (_, body) = split(&out[ok.len()..]);
        assert_eq!(body["code"], "invalid_request");
    }

    #[tokio::test]
    async fn every_other_response_passes_untouched() {
        let responses: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
              content-length: 17\r\n\r\n{\"code\":\"x\",\"m\":1}",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            // A body that happens to end like hyper's answer is still a body.
            b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\nHTTP/1.1 400 Bad Request\r\n\r\n\r\n\r\n\r\n",
        ];
        for response in responses {
            let (out, codes) = through(&[response], usize::MAX).await;
            assert_eq!(out, response, "{}", String::from_utf8_lossy(response));
            assert!(codes.is_empty());
        }
    }
}
