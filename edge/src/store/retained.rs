//! Retained MQTT messages: rumqttd keeps them in memory only, so the store keeps each topic's
//! last retained message (written with the events of the same device read, before the device
//! is acknowledged) and the edge publishes them into the broker again at start.

use rocksdb::{IteratorMode, WriteBatch};

use super::{CF_RETAINED, Store, StoreError};

impl Store {
    /// Adds retained messages to `batch`: an empty payload clears the topic's, as MQTT says.
    pub(super) fn put_retained(
        &self,
        batch: &mut WriteBatch,
        retained: &[(bytes::Bytes, bytes::Bytes)],
    ) {
        let cf = self.cf(CF_RETAINED);
        for (topic, payload) in retained {
            if payload.is_empty() {
                batch.delete_cf(cf, topic);
            } else {
                batch.put_cf(cf, topic, payload);
            }
        }
    }

    /// Every retained message kept, by topic.
    pub fn retained(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = vec![];
        for kv in self
            .db
            .iterator_cf(self.cf(CF_RETAINED), IteratorMode::Start)
        {
            let (k, v) = kv?;
            // Topics come from the MQTT scanner, which only keeps UTF-8 ones (rumqttd refuses
            // the rest).
            out.push((String::from_utf8_lossy(&k).into_owned(), v.into_vec()));
        }
        Ok(out)
    }
}
