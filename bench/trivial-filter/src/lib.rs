//! Trivial proxy-wasm HTTP filter: reads `x-api-key` and adds `x-trivial` ("1" when the
//! key header was present). The cost of a Rust proxy-wasm filter that does almost nothing.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request;

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let len = self.get_http_request_header("x-api-key").map_or(0, |v| v.len());
        self.set_http_request_header("x-trivial", Some(if len > 0 { "1" } else { "0" }));
        Action::Continue
    }
}
