//! The thin glue between Envoy and the pure core: the root context reads the configuration and
//! sends the cache writes that must outlive a stream; the HTTP context (`http.rs`) feeds
//! request events to an `Exchange` and carries out its effects.

mod calls;
mod http;
mod metrics;
mod writes;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel as HostLevel};

use crate::access_log::LogLevel;
use crate::config::Settings;
use crate::hot::HotSet;
use crate::metrics::Counter;
use metrics::Metrics;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(HostLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root {
            settings: None,
            metrics: Rc::new(Metrics::default()),
            hot: Rc::new(RefCell::new(HotSet::new(0))),
            writes_in_flight: Vec::new(),
        })
    });
}}

/// How often the root context sends queued cache writes.
const WRITE_TICK: Duration = Duration::from_millis(50);

struct Root {
    settings: Option<Rc<Settings>>,
    metrics: Rc<Metrics>,
    /// This worker's hot set (each worker has its own VM, so its own root context).
    hot: Rc<RefCell<HotSet>>,
    writes_in_flight: Vec<u32>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, _body_size: usize, _num_trailers: usize) {
        let Some(pos) = self.writes_in_flight.iter().position(|t| *t == token_id) else { return };
        self.writes_in_flight.swap_remove(pos);
        let ok = num_headers > 0
            && calls::call_response_header(":status").and_then(|s| s.parse::<u32>().ok()).is_some_and(|s| s < 300);
        if !ok {
            self.metrics.count(&Counter::CacheL2Errors, 1);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = calls::plugin_configuration();
        let env = |name: &str| std::env::var(name).ok();
        match Settings::from_json(&config, &env) {
            Ok(settings) => {
                for w in &settings.warnings {
                    calls::log(LogLevel::Warn, &format!("gemini-image-filter: {w}"));
                }
                calls::log(LogLevel::Info, &format!("gemini-image-filter: configured ({})", settings.summary()));
                if settings.cache.as_ref().is_some_and(|c| c.l2.is_some()) {
                    calls::set_tick(WRITE_TICK);
                }
                let hot_bytes = settings.cache.as_ref().and_then(|c| c.l1.as_ref()).map_or(0, |l1| l1.hot_bytes);
                self.hot = Rc::new(RefCell::new(HotSet::new(hot_bytes)));
                self.settings = Some(Rc::new(settings));
                self.metrics = Rc::new(Metrics::define());
                true
            }
            Err(e) => {
                calls::log(
                    LogLevel::Error,
                    &format!("gemini-image-filter: invalid configuration, refusing to start: {e}"),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        for write in writes::drain() {
            match calls::dispatch(&write.call.cluster, &write.call.headers, &write.entry, write.call.timeout_ms) {
                Ok(token) => self.writes_in_flight.push(token),
                Err(_) => self.metrics.count(&Counter::CacheL2Errors, 1),
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let settings = self.settings.clone()?;
        Some(Box::new(http::ImageHttp::new(settings, self.metrics.clone(), self.hot.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
