//! The `images` table (owner: RootfsCache): one [`ImageEntry`] per base digest, and the
//! machine references to bases, read from the machine records.

use std::collections::BTreeMap;

use redb::ReadableTable;

use super::codec::{decode, encode};
use super::{IMAGES, MACHINES, Store, StoreError};
use crate::image::ImageEntry;
use crate::machine::record::{MachineRecord, MachineState};

impl Store {
    /// Writes the entry of base `digest`. Idempotent: the same entry twice is one entry.
    pub fn put_image(&self, digest: &str, entry: &ImageEntry) -> Result<(), StoreError> {
        let txn = self.write()?;
        txn.open_table(IMAGES)?
            .insert(digest, encode(entry)?.as_slice())?;
        super::commit(txn)?;
        Ok(())
    }

    /// The entry of base `digest`, if any.
    pub fn image(&self, digest: &str) -> Result<Option<ImageEntry>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(IMAGES)?;
        Ok(table.get(digest)?.map(|v| decode(v.value())).transpose()?)
    }

    /// Every entry, by base digest.
    pub fn images(&self) -> Result<BTreeMap<String, ImageEntry>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(IMAGES)?;
        let mut out = BTreeMap::new();
        for entry in table.iter()? {
            let (digest, value) = entry?;
            out.insert(digest.value().to_string(), decode(value.value())?);
        }
        Ok(out)
    }

    /// Removes the entries of `digests` in one commit. Idempotent.
    pub fn remove_images(&self, digests: &[String]) -> Result<(), StoreError> {
        let txn = self.write()?;
        {
            let mut table = txn.open_table(IMAGES)?;
            for digest in digests {
                table.remove(digest.as_str())?;
            }
        }
        super::commit(txn)?;
        Ok(())
    }

    /// For every base digest named by a machine that is not destroyed, those machines'
    /// names, sorted. A failed machine still counts: it can be started again, and its
    /// disk is then cloned from the base it names.
    pub fn base_references(&self) -> Result<BTreeMap<String, Vec<String>>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(MACHINES)?;
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            let rec: MachineRecord = decode(value.value())?;
            if rec.state == MachineState::Destroyed {
                continue;
            }
            if let Some(digest) = rec.resources.base_digest {
                out.entry(digest).or_default().push(rec.name);
            }
        }
        for names in out.values_mut() {
            names.sort();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::spec::MachineSpec;
    use crate::store::Room;

    #[test]
    fn entries_round_trip_and_references_come_from_live_machines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hearth.redb");
        let store = Store::open(&path).expect("open");
        let entry = ImageEntry {
            names: vec!["127.0.0.1:5000/app:v1".into()],
            manifest_digest: Some("sha256:00".into()),
            blobs: vec!["sha256:11".into()],
            config_digest: Some("sha256:22".into()),
            built_unix: 1,
            last_used_unix: 2,
        };
        store.put_image("d1", &entry).expect("put");
        store.put_image("d2", &ImageEntry::default()).expect("put");
        drop(store);
        // Durable across a reopen.
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.image("d1").expect("get"), Some(entry.clone()));
        assert_eq!(store.images().expect("list").len(), 2);
        store
            .remove_images(&["d2".into(), "missing".into()])
            .expect("remove");
        assert_eq!(
            store
                .images()
                .expect("list")
                .into_keys()
                .collect::<Vec<_>>(),
            ["d1"]
        );

        let room = Room {
            vcpus: 8,
            memory_mib: 4096,
            slots: 16,
        };
        for (id, name, base) in [
            ("aaaaaaaaaa", "web", Some("d1")),
            ("bbbbbbbbbb", "api", Some("d1")),
            ("cccccccccc", "new", None),
            ("dddddddddd", "gone", Some("d1")),
        ] {
            let mut rec = MachineRecord::new(
                id.into(),
                name.into(),
                id.into(),
                MachineSpec {
                    image: "demo".into(),
                    vcpus: 1,
                    memory_mib: 128,
                    ..MachineSpec::default()
                },
                1,
            );
            rec.resources.base_digest = base.map(str::to_string);
            if name == "gone" {
                rec.state = MachineState::Destroyed;
            }
            store
                .create_machine(rec, room, crate::store::RequestBody([0; 32]))
                .expect("create");
        }
        let refs = store.base_references().expect("refs");
        assert_eq!(refs.len(), 1);
        assert_eq!(refs["d1"], ["api", "web"]);
    }
}
