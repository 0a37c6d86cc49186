//! The gRPC backend of the HTTP harness (perf/http_harness.py): `ward-perf-grpc-backend ADDR`
//! serves gRPC over h2c on ADDR and answers every unary call with one fixed message and
//! `grpc-status: 0` in the trailers, as a real gRPC server does on the wire.
//!
//! Written on hyper rather than with a gRPC framework: the harness needs a backend far faster
//! than the proxies it measures (a Python grpcio server would be the bottleneck), and one that
//! needs no generated code. It reads the whole request message before answering, as unary
//! calls do.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpListener;

/// The response message: a length-prefixed gRPC frame (uncompressed) of 16 bytes.
fn message() -> Bytes {
    let payload = b"hello from grpc!";
    let mut frame = BytesMut::with_capacity(5 + payload.len());
    frame.put_u8(0);
    frame.put_u32(payload.len() as u32);
    frame.put_slice(payload);
    frame.freeze()
}

/// The frames of a unary answer: the message, then the trailers.
struct Unary(std::vec::IntoIter<Frame<Bytes>>);

impl hyper::body::Body for Unary {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.next().map(Ok))
    }
}

async fn unary(req: http::Request<Incoming>) -> Result<Response<Unary>, Infallible> {
    // The whole request message, as a unary handler gets it.
    let _ = req.into_body().collect().await;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = vec![Frame::data(message()), Frame::trailers(trailers)];
    let mut response = Response::new(Unary(frames.into_iter()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| std::io::Error::other("usage: ward-perf-grpc-backend ADDR"))?;
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(unary));
            let _ = served.await;
        });
    }
}
