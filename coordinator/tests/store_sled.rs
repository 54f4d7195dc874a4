//! The store conformance suite on the sled backend, plus sled-specific
//! checks (damaged records are reported, not skipped).

use tcc_coordinator::error::{Error, Result};
use tcc_coordinator::store::Store;
use tcc_coordinator::store::conformance::Harness;
use tcc_coordinator::store::sled::SledStore;

struct SledHarness(tempfile::TempDir);

impl Harness for SledHarness {
    type S = SledStore;
    fn open(&self) -> Result<SledStore> {
        SledStore::open(self.0.path())
    }
}

fn harness() -> SledHarness {
    match tempfile::tempdir() {
        Ok(d) => SledHarness(d),
        Err(e) => panic!("tempdir: {e}"),
    }
}

tcc_coordinator::store_conformance_tests!(harness());

#[tokio::test]
async fn a_damaged_record_is_reported_with_its_key() -> Result<()> {
    let dir = harness();
    let id = uuid::Uuid::now_v7();
    {
        // Write garbage where a transaction record belongs, with sled directly.
        let db = sled::open(dir.0.path()).map_err(Error::from)?;
        let tree = db.open_tree("tcc").map_err(Error::from)?;
        let mut key = vec![0x01];
        key.extend_from_slice(id.as_bytes());
        tree.insert(key, vec![1u8, 0xff, 0xff, 0xff]).map_err(Error::from)?;
        db.flush().map_err(Error::from)?;
    }
    let store = dir.open()?;
    match store.scan(None, 10).await {
        Err(Error::Corrupt { key, .. }) => assert!(key.contains(&id.to_string()), "{key}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    Ok(())
}
