//! The in-memory index the embedded stores answer their queries from.
//!
//! A database backend has secondary indexes; the embedded stores keep
//! this one instead, built at open from every stored record and updated
//! after every successful write. It holds, per transaction, only what the
//! queries of [`Store`](super::Store) sort or filter by:
//!
//! * unfinished transactions (state, creation time) in id order: recovery
//!   and listing of unfinished states;
//! * (deadline, id) of ACTIVE ones: the sweeper;
//! * (earliest pending participant's due time, id) of CONFIRMING/CANCELLING
//!   ones: delivery;
//! * (finish time, id) of CONFIRMED/CANCELLED ones: garbage collection.
//!
//! Updates are applied in the order the writes were applied: the sled
//! store does it on its flusher thread as each write is applied (not in
//! the writer's task, which may be cancelled once the write is durable),
//! the in-memory store under its lock. Updates also carry the record's
//! version, and an older version never replaces a newer one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{TxnId, TxnRecord, TxnState};

/// What the index knows of an unfinished transaction.
#[derive(Clone, Copy, Debug)]
struct Entry {
    version: u64,
    state: TxnState,
    created_ms: i64,
    deadline: Option<i64>,
    due: Option<i64>,
}

/// What the index takes from a record: computed by the writer, applied
/// by whoever applies the write.
#[derive(Clone, Copy, Debug)]
pub struct Keys {
    id: TxnId,
    version: u64,
    state: TxnState,
    created_ms: i64,
    deadline: Option<i64>,
    due: Option<i64>,
    finished: Option<i64>,
}

impl Keys {
    /// The index keys of `txn`.
    pub fn of(txn: &TxnRecord) -> Keys {
        Keys {
            id: txn.id,
            version: txn.version,
            state: txn.state,
            created_ms: txn.created_ms,
            deadline: (txn.state == TxnState::Active).then_some(txn.deadline_ms),
            due: txn.delivery_due_ms(),
            finished: txn.state.is_finished().then_some(txn.finished_ms),
        }
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct TxnIndex {
    unfinished: BTreeMap<TxnId, Entry>,
    deadlines: BTreeSet<(i64, TxnId)>,
    deliveries: BTreeSet<(i64, TxnId)>,
    finished: BTreeSet<(i64, TxnId)>,
    finished_at: HashMap<TxnId, i64>,
}

impl TxnIndex {
    /// Records `txn` as written (created or updated).
    pub fn put(&mut self, txn: &TxnRecord) {
        self.apply(Keys::of(txn));
    }

    /// Records a write by its keys.
    pub fn apply(&mut self, k: Keys) {
        let id = k.id;
        if let Some(old) = self.unfinished.get(&id).copied() {
            if old.version >= k.version {
                return;
            }
            self.unfinished.remove(&id);
            if let Some(d) = old.deadline {
                self.deadlines.remove(&(d, id));
            }
            if let Some(d) = old.due {
                self.deliveries.remove(&(d, id));
            }
        }
        if let Some(finished_ms) = k.finished {
            if self.finished_at.insert(id, finished_ms).is_none() {
                self.finished.insert((finished_ms, id));
            }
            return;
        }
        if self.finished_at.contains_key(&id) {
            return; // a finished record never changes again
        }
        let entry =
            Entry { version: k.version, state: k.state, created_ms: k.created_ms, deadline: k.deadline, due: k.due };
        if let Some(d) = entry.deadline {
            self.deadlines.insert((d, id));
        }
        if let Some(d) = entry.due {
            self.deliveries.insert((d, id));
        }
        self.unfinished.insert(id, entry);
    }

    /// Forgets a deleted transaction.
    pub fn remove(&mut self, id: TxnId) {
        if let Some(t) = self.finished_at.remove(&id) {
            self.finished.remove(&(t, id));
        }
        if let Some(old) = self.unfinished.remove(&id) {
            if let Some(d) = old.deadline {
                self.deadlines.remove(&(d, id));
            }
            if let Some(d) = old.due {
                self.deliveries.remove(&(d, id));
            }
        }
    }

    /// Unfinished ids after `after`, in id order.
    pub fn unfinished(&self, after: Option<TxnId>, limit: usize) -> Vec<TxnId> {
        let range = match after {
            Some(a) => self.unfinished.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.unfinished.range(..),
        };
        range.take(limit).map(|(id, _)| *id).collect()
    }

    /// ACTIVE ids with a deadline at or before `now`, and the next deadline.
    pub fn due_deadlines(&self, now: i64, limit: usize) -> (Vec<TxnId>, Option<i64>) {
        due(&self.deadlines, now, limit)
    }

    /// Delivering ids due at or before `until`.
    pub fn due_deliveries(&self, until: i64, limit: usize) -> Vec<TxnId> {
        due(&self.deliveries, until, limit).0
    }

    /// Finished ids that finished at or before `until`, and the next finish
    /// time after it.
    pub fn collectable(&self, until: i64, limit: usize) -> (Vec<TxnId>, Option<i64>) {
        due(&self.finished, until, limit)
    }

    /// How many unfinished transactions are in each state (a scan of the
    /// unfinished ones, for a metrics scrape).
    pub fn count_unfinished(&self) -> Vec<(TxnState, u64)> {
        let mut counts: BTreeMap<usize, (TxnState, u64)> = BTreeMap::new();
        for e in self.unfinished.values() {
            let slot = TxnState::ALL.iter().position(|s| *s == e.state).unwrap_or(0);
            counts.entry(slot).or_insert((e.state, 0)).1 += 1;
        }
        counts.into_values().collect()
    }

    /// Whether every state in `states` is an unfinished one (so the index
    /// alone can answer a listing of them).
    pub fn covers(states: &[TxnState]) -> bool {
        !states.is_empty() && states.iter().all(|s| !s.is_finished())
    }

    /// Unfinished ids in `states` created at or before `created_until`,
    /// after `after`, in id order; and the id to continue after if the page
    /// is full.
    pub fn list_unfinished(
        &self,
        states: &[TxnState],
        created_until: i64,
        after: Option<TxnId>,
        limit: usize,
    ) -> (Vec<TxnId>, Option<TxnId>) {
        let range = match after {
            Some(a) => self.unfinished.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.unfinished.range(..),
        };
        let mut out = Vec::new();
        for (id, e) in range {
            if states.contains(&e.state) && e.created_ms <= created_until {
                out.push(*id);
                if out.len() == limit {
                    return (out, Some(*id));
                }
            }
        }
        (out, None)
    }
}

fn due(set: &BTreeSet<(i64, TxnId)>, until: i64, limit: usize) -> (Vec<TxnId>, Option<i64>) {
    let mut out = Vec::new();
    for &(t, id) in set {
        if t > until {
            return (out, Some(t));
        }
        if out.len() == limit {
            return (out, Some(t));
        }
        out.push(id);
    }
    (out, None)
}
