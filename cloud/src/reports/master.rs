//! Master data: ideal cycle times per machine and the shift calendar, from the configuration
//! and then the edits saved through the API (`master.json` in the data directory).

use std::collections::BTreeMap;
use std::path::Path;

use millrace_shared::ShiftCalendar;
use serde::{Deserialize, Serialize};

use crate::config::CloudConfig;

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

/// Where edits through the API are kept, in the data directory.
const SAVED: &str = "master.json";

impl Master {
    /// The configuration's master data, then the edits saved through the API.
    pub fn load(cfg: &CloudConfig) -> Self {
        let mut m = Self {
            ideal_cycle_ms: cfg
                .master
                .machines
                .iter()
                .map(|s| (s.id.to_string(), s.ideal_cycle_time_ms))
                .collect(),
            default_ideal_cycle_ms: cfg.master.default_ideal_cycle_ms,
            calendar: cfg.master.calendar.clone(),
        };
        let saved = cfg.data_dir.join(SAVED);
        match std::fs::read(&saved).map(|b| serde_json::from_slice::<Self>(&b)) {
            Ok(Ok(s)) => m.ideal_cycle_ms.extend(s.ideal_cycle_ms),
            Ok(Err(e)) => {
                tracing::error!(path = %saved.display(), error = %e, "saved master data unreadable; using the configuration")
            }
            Err(_) => {}
        }
        m
    }

    /// Saves these master data in `data_dir` (atomically: temp file, rename). Blocks.
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = data_dir.join(SAVED);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serializes"))?;
        std::fs::rename(&tmp, &path)
    }
}
