//! Python children for the L7 tests: real gRPC (grpcio) and WebSocket (websockets) apps and
//! clients, written as scripts into the test's directory.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use crate::proc::TempDir;

/// A python child (killed when dropped) and the first line it printed.
pub struct Python {
    child: Child,
    pub first_line: String,
}

impl Python {
    /// Runs `script` with `args`; `None` (after a loud skip) when python3 or `module` is missing.
    pub fn start(
        dir: &TempDir,
        name: &str,
        script: &str,
        args: &[&str],
        module: &str,
    ) -> Option<Self> {
        let have = crate::tool_available("python3", &["-c", &format!("import {module}")]);
        if !have {
            crate::skipped(&format!(
                "python3 with the `{module}` package is not installed"
            ));
            return None;
        }
        let path = dir.join(name);
        std::fs::write(&path, script).unwrap();
        let mut child = Command::new("python3")
            .arg(&path)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3");
        let mut out = child.stdout.take().unwrap();
        let mut first_line = Vec::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            first_line.push(byte[0]);
        }
        let first_line = String::from_utf8_lossy(&first_line).into_owned();
        Some(Python { child, first_line })
    }

    /// Runs `script` to its end; its stdout.
    pub fn run(dir: &TempDir, name: &str, script: &str, args: &[&str]) -> String {
        let path = dir.join(name);
        std::fs::write(&path, script).unwrap();
        let out = Command::new("python3")
            .arg(&path)
            .args(args)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The loopback address of a server that printed its port as its first line.
    pub fn port_addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.first_line.trim())
            .parse()
            .unwrap_or_else(|_| panic!("the server printed {:?}", self.first_line))
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gRPC service with raw-bytes messages (no generated code). `Watch` (server streaming):
/// three messages echoing the request, then a custom trailer, and status NOT_FOUND when asked
/// for "missing". `Get` (unary): `stock:<request>` and the same trailer, or NOT_FOUND.
pub const GRPC_SERVER: &str = r#"
import sys
from concurrent import futures
import grpc

def watch(request, context):
    for i in range(3):
        yield b"update-%d:" % i + request
    context.set_trailing_metadata((("x-stock-trailer", "kept"),))
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such item")

def get(request, context):
    context.set_trailing_metadata((("x-stock-trailer", "kept"),))
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such item")
    return b"stock:" + request

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
handler = grpc.method_handlers_generic_handler("test.Stock", {
    "Watch": grpc.unary_stream_rpc_method_handler(watch),
    "Get": grpc.unary_unary_rpc_method_handler(get),
})
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"#;

/// Calls each method named in argv[2] (comma-separated; `Watch` when absent) for "item", then
/// for "missing", at argv[1], all on one channel; prints one JSON line per call.
pub const GRPC_CLIENT: &str = r#"
import json, sys
import grpc

channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
methods = sys.argv[2].split(",") if len(sys.argv) > 2 else ["Watch"]

def watch(item):
    call = channel.unary_stream("/test.Stock/Watch")(item, timeout=20)
    messages = []
    try:
        for m in call:
            messages.append(m.decode())
    except grpc.RpcError:
        pass
    return messages, call

def get(item):
    try:
        response, call = channel.unary_unary("/test.Stock/Get").with_call(item, timeout=20)
        return [response.decode()], call
    except grpc.RpcError as call:
        return [], call

for method in methods:
    for item in (b"item", b"missing"):
        messages, call = {"Watch": watch, "Get": get}[method](item)
        print(json.dumps({
            "messages": messages,
            "code": call.code().name,
            "details": call.details(),
            "trailers": sorted([k, v] for k, v in call.trailing_metadata() or ()),
        }))
"#;

/// A WebSocket echo server (python websockets): prints its port, echoes every message.
pub const WS_SERVER: &str = r#"
from websockets.sync.server import serve

def echo(ws):
    for message in ws:
        ws.send(message)

with serve(echo, "127.0.0.1", 0) as server:
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever()
"#;

/// Sends a text and a 200 KB binary message to the WebSocket at argv[1]; prints what came back.
pub const WS_CLIENT: &str = r#"
import sys
from websockets.sync.client import connect

with connect("ws://%s/chat" % sys.argv[1], open_timeout=20, close_timeout=5) as ws:
    ws.send("hello through two sidecars")
    print(ws.recv(timeout=20))
    big = bytes(range(256)) * 800
    ws.send(big)
    print("binary", ws.recv(timeout=20) == big)
"#;
