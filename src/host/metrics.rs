//! The filter's metrics, defined once per root context and updated by id.

use std::collections::HashMap;

use super::calls;
use crate::config::Settings;
use crate::metrics::{Counter, Gauge, Histogram};

#[derive(Default)]
pub struct Metrics {
    counters: HashMap<Counter, u32>,
    histograms: HashMap<Histogram, u32>,
    gauges: HashMap<Gauge, u32>,
}

impl Metrics {
    pub fn define(settings: &Settings) -> Metrics {
        let counters = Counter::all(settings)
            .into_iter()
            .filter_map(|c| Some((calls::define_counter(&c.name())?, c)))
            .map(|(id, c)| (c, id))
            .collect();
        let histograms =
            Histogram::ALL.into_iter().filter_map(|h| Some((h, calls::define_histogram(&h.name())?))).collect();
        let gauges = Gauge::all(&settings.backends)
            .into_iter()
            .filter_map(|g| Some((calls::define_gauge(&g.name())?, g)))
            .map(|(id, g)| (g, id))
            .collect();
        Metrics { counters, histograms, gauges }
    }

    pub fn count(&self, counter: &Counter, by: u64) {
        if let Some(id) = self.counters.get(counter) {
            calls::increment(*id, by);
        }
    }

    pub fn observe(&self, histogram: Histogram, value: u64) {
        if let Some(id) = self.histograms.get(&histogram) {
            calls::record(*id, value);
        }
    }

    pub fn set(&self, gauge: &Gauge, value: u64) {
        if let Some(id) = self.gauges.get(gauge) {
            calls::record(*id, value);
        }
    }
}
