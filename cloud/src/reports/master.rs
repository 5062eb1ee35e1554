//! Master data: ideal cycle times per machine and the shift calendar, from the configuration
//! and then the edits saved through the API (`master.json` in the data directory).

use std::collections::BTreeMap;

use millrace_shared::ShiftCalendar;
use serde::{Deserialize, Serialize};

use crate::config::CloudConfig;
use crate::dataset::{Dataset, DatasetError};

/// Master data: ideal cycle times and the shift calendar.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Master {
    /// Ideal cycle time per `site/line/machine`, ms.
    pub ideal_cycle_ms: BTreeMap<String, u32>,
    /// For machines not listed.
    pub default_ideal_cycle_ms: u32,
    /// The shift calendar (UTC).
    pub calendar: ShiftCalendar,
}

impl Master {
    pub(crate) fn ideal(&self, machine: &str) -> u64 {
        u64::from(
            self.ideal_cycle_ms
                .get(machine)
                .copied()
                .unwrap_or(self.default_ideal_cycle_ms),
        )
    }
}

/// Where edits through the API are kept: beside the tables (the data directory, or the bucket's
/// prefix, where every cloud node reads them).
pub const SAVED: &str = "master.json";

impl Master {
    /// The configuration's master data.
    pub fn configured(cfg: &CloudConfig) -> Self {
        Self {
            ideal_cycle_ms: cfg
                .master
                .machines
                .iter()
                .map(|s| (s.id.to_string(), s.ideal_cycle_time_ms))
                .collect(),
            default_ideal_cycle_ms: cfg.master.default_ideal_cycle_ms,
            calendar: cfg.master.calendar.clone(),
        }
    }

    /// The configuration's master data, then the edits saved through the API (`saved`: the
    /// stored document, if any).
    pub fn with_saved(cfg: &CloudConfig, saved: Option<&[u8]>) -> Self {
        let mut m = Self::configured(cfg);
        if let Some(bytes) = saved {
            match serde_json::from_slice::<Self>(bytes) {
                Ok(s) => m.ideal_cycle_ms.extend(s.ideal_cycle_ms),
                Err(e) => {
                    tracing::error!(document = SAVED, error = %e, "saved master data unreadable; using the configuration")
                }
            }
        }
        m
    }

    /// The configuration's master data and the edits stored beside `ds`'s tables.
    pub fn load(cfg: &CloudConfig, ds: &Dataset) -> Self {
        match ds.document(SAVED) {
            Ok(doc) => Self::with_saved(cfg, doc.as_ref().map(|d| d.bytes.as_slice())),
            Err(e) => {
                tracing::error!(error = %e, "reading saved master data failed; using the configuration");
                Self::configured(cfg)
            }
        }
    }

    /// Sets ideal cycle times and stores them beside `ds`'s tables, merged into what is stored
    /// (another node's edits included: an update is only written over the version it read).
    /// Blocks.
    pub fn save_edits(
        cfg: &CloudConfig,
        ds: &Dataset,
        edits: &[(String, u32)],
    ) -> Result<Self, DatasetError> {
        for _ in 0..20 {
            let doc = ds.document(SAVED)?;
            let mut m = Self::with_saved(cfg, doc.as_ref().map(|d| d.bytes.as_slice()));
            m.ideal_cycle_ms.extend(edits.iter().cloned());
            let bytes = serde_json::to_vec_pretty(&m).expect("serializes");
            if ds.put_document(SAVED, bytes, doc.as_ref())? {
                return Ok(m);
            }
        }
        Err(DatasetError::Conflict(SAVED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A saved document that is not master data (a damaged file, a hand edit) leaves the
    /// configuration's master data in force; a good one adds its ideal cycle times.
    #[test]
    fn unreadable_saved_master_data_falls_back_to_the_configuration() {
        let mut cfg = CloudConfig::default();
        cfg.master.default_ideal_cycle_ms = 30_000;
        for bad in [&b"{not json"[..], b"[]", b""] {
            let m = Master::with_saved(&cfg, Some(bad));
            assert!(m.ideal_cycle_ms.is_empty());
            assert_eq!(m.default_ideal_cycle_ms, 30_000);
        }
        let good = br#"{"ideal_cycle_ms":{"s/l/m":45000},"default_ideal_cycle_ms":0,"calendar":{"shifts":[]}}"#;
        let m = Master::with_saved(&cfg, Some(good));
        assert_eq!(m.ideal_cycle_ms["s/l/m"], 45_000);
        assert_eq!(m.default_ideal_cycle_ms, 30_000);
    }
}
