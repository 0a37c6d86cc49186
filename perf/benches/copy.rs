//! Throughput of `ward_proxy::copy::bidirectional`, the loop that moves every byte of a
//! forwarded connection: 16 MiB pushed one way per iteration (peer -> app, as a download
//! through the inbound hop), over tokio in-memory duplex pipes and over loopback TCP pairs,
//! on a current-thread runtime (ward `--workers 1`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use ward_proxy::copy::{bidirectional, CopyEnd};

const TOTAL: usize = 16 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// Writes TOTAL bytes into `src`, reads them out of `dst`, with `bidirectional` between the
/// far ends `peer` and `local`. Returns the time from the first write to the last byte read.
async fn push<S, P, L, D>(mut src: S, peer: P, local: L, mut dst: D) -> Duration
where
    S: AsyncWrite + Unpin + Send + 'static,
    P: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    L: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: AsyncRead + Unpin,
{
    let proxy = tokio::spawn(async move {
        let close = CancellationToken::new();
        let rx = metrics::Counter::noop();
        let tx = metrics::Counter::noop();
        bidirectional(peer, local, Duration::from_secs(60), &close, &rx, &tx).await
    });
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; CHUNK];
        let mut left = TOTAL;
        while left > 0 {
            let n = left.min(CHUNK);
            src.write_all(&chunk[..n]).await.expect("write");
            left -= n;
        }
        src.shutdown().await.expect("shutdown");
        src
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    while got < TOTAL {
        let n = dst.read(&mut buf).await.expect("read");
        assert!(n > 0, "early EOF after {got} bytes");
        got += n;
    }
    let elapsed = start.elapsed();
    // Close the other direction so the copy ends.
    drop(dst);
    let src = writer.await.expect("writer");
    drop(src);
    let end = proxy.await.expect("proxy");
    assert!(
        matches!(end, CopyEnd::Done | CopyEnd::Failed(_)),
        "copy ended: {end:?}"
    );
    elapsed
}

async fn tcp_pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let addr = listener.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let a = a.expect("connect");
    let (b, _) = b.expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");

    let mut group = c.benchmark_group("copy");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for pipe in [64 * 1024usize, 1024 * 1024] {
        group.bench_with_input(BenchmarkId::new("duplex", pipe), &pipe, |b, &pipe| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (src, peer) = tokio::io::duplex(pipe);
                    let (local, dst) = tokio::io::duplex(pipe);
                    total += push(src, peer, local, dst).await;
                }
                total
            })
        });
    }
    let listener = &listener;
    group.bench_function("loopback_tcp", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (src, peer) = tcp_pair(listener).await;
                let (local, dst) = tcp_pair(listener).await;
                total += push(src, peer, local, dst).await;
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
