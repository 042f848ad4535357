//! The filter's metrics, defined once per root context and updated by id.

use std::collections::HashMap;

use super::calls;
use crate::metrics::{Counter, Histogram};
use crate::model::Families;

#[derive(Default)]
pub struct Metrics {
    counters: HashMap<Counter, u32>,
    histograms: HashMap<Histogram, u32>,
}

impl Metrics {
    pub fn define(families: &Families) -> Metrics {
        let counters = Counter::all(families)
            .into_iter()
            .filter_map(|c| Some((calls::define_counter(&c.name())?, c)))
            .map(|(id, c)| (c, id))
            .collect();
        let histograms =
            Histogram::ALL.into_iter().filter_map(|h| Some((h, calls::define_histogram(&h.name())?))).collect();
        Metrics { counters, histograms }
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
}
