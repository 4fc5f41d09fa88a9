//! `capy handler run` and `capy bench handlers`.

use std::path::Path;

pub fn handler_run_cmd(
    _file: &Path,
    _event: &str,
    _state: Option<&str>,
    _args: Option<&str>,
) -> i32 {
    0
}

pub fn bench_handlers(_json: bool) -> i32 {
    0
}
