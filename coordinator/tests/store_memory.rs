//! The store conformance suite on the in-memory backend.

use std::sync::Arc;

use tcc_coordinator::error::Result;
use tcc_coordinator::store::Store;
use tcc_coordinator::store::conformance::Harness;
use tcc_coordinator::store::memory::MemStore;

/// "Reopening" an in-memory store is getting the same store again: what a
/// simulated crash does (the engine goes, the store stays).
struct MemHarness(Arc<MemStore>);

#[async_trait::async_trait]
impl Harness for MemHarness {
    async fn open(&self) -> Result<Arc<dyn Store>> {
        Ok(self.0.clone())
    }
}

tcc_coordinator::store_conformance_tests!(MemHarness(Arc::new(MemStore::new())));
