//! `ward proxy`'s config (what `--check` validates), from text: no file is read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use ward_config::proxy::ProxyConfig;

const PATH: &str = "/etc/ward/proxy.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = ProxyConfig::parse(Path::new(PATH), text) {
        // One sentence naming the file, with nothing from the input that moves the terminal.
        let msg = e.to_string();
        assert!(msg.starts_with(PATH), "{msg:?}");
        assert!(!msg.chars().any(char::is_control), "{msg:?}");
    }
});
