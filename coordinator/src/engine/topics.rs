//! The try phase's topics: appends (with idempotency receipts and the
//! per-topic byte limit) and reads.
//!
//! A retried append whose first try landed is answered from its receipt in
//! any state (the commands are part of the topic). The receipt is looked
//! up under the transaction's lock, which the first try holds until its
//! write is durable, so a retry is never told "stored" about a write that
//! is still in flight; and again after a conflict, so a retry that raced
//! another writer of the same key finds its receipt. It is skipped while
//! the topic is empty in the record at hand: a receipt is stored with its
//! commands, so there is none yet (and if the record is stale, the write
//! conflicts, and the lookup runs again on the reloaded record).

use super::{Engine, Found, How, lifecycle::accepted_late, until_no_conflict, validate};
use crate::config::fixed;
use crate::error::{Error, Result};
use crate::lock;
use crate::model::{AppendReceipt, CommandRecord, Event, PartialId, ParticipantRecord, TxnId, TxnRecord, apply};
use crate::store::AppendBatch;
use validate::NewCommand;

/// Who appends, as far as the partial's service is concerned.
#[derive(Clone, Copy, Debug)]
pub enum Appender<'a> {
    /// Not said: any partial.
    Anyone,
    /// The request says it comes from this service (`AppendRequest.service`):
    /// a partial of another service is INVALID_ARGUMENT.
    Declared(&'a str),
    /// The caller's authenticated identity: a partial of another service is
    /// PERMISSION_DENIED.
    Identity(&'a str),
}

impl Appender<'_> {
    /// Whether this appender may append to `partial`, of service `owner`.
    fn check(self, partial: PartialId, owner: &str) -> Result<()> {
        match self {
            Appender::Declared(service) if owner != service => Err(Error::invalid(format!(
                "partial transaction {partial} belongs to service {owner:?}, not {service:?}"
            ))),
            Appender::Identity(name) if owner != name => Err(Error::PermissionDenied(format!(
                "identity {name:?} may not call Topics.Append on partial transaction {partial}: it belongs to service {owner:?}, and a service appends only to its own partials"
            ))),
            _ => Ok(()),
        }
    }
}

impl Engine {
    /// Appends a batch to a partial topic. Returns the receipt and whether it
    /// was a duplicate of an earlier append with the same idempotency key.
    /// The partial must belong to the service `appender` names, if any.
    pub async fn append(
        &self,
        partial: PartialId,
        appender: Appender<'_>,
        commands: Vec<NewCommand>,
        idempotency_key: &str,
    ) -> Result<(AppendReceipt, bool)> {
        let key = validate::idempotency_key(idempotency_key)?;
        let bytes = validate::commands(&self.limits, &commands)?;
        let digest = validate::digest(&commands);
        let n = commands.len() as u64;
        let id = self.txn_of(partial).await?;
        let found = self.find(id).await.map_err(|e| match e {
            Error::NotFound(_) => {
                Error::NotFound(format!("partial transaction {partial} not found (transaction {id} was collected)"))
            }
            other => other,
        });
        let live = match found? {
            Found::Live(live) => live,
            Found::Finished(txn) => {
                if let Some(owner) = txn.participant_index(partial).map(|i| txn.participants[i].service.as_str()) {
                    appender.check(partial, owner)?;
                }
                if let Some(key) = key
                    && let Some(r) = self.store.find_receipt(partial, key).await?
                {
                    return check_receipt(r, n, digest, key).map(|r| (r, true));
                }
                let event = Event::Append { participant: 0, commands: n, bytes };
                return Err(self.apply_finished(txn, vec![event]).err().unwrap_or_else(|| accepted_late(id)));
            }
        };
        let mut guard = live.record.lock().await;
        // Numbered by each attempt (a retry after a conflict renumbers).
        let mut records: Vec<CommandRecord> = commands
            .into_iter()
            .map(|c| CommandRecord { sequence: 0, kind: c.kind, key: c.key, payload: c.payload })
            .collect();
        until_no_conflict!(
            self,
            &live,
            guard,
            async {
                let idx = guard.participant_index(partial).ok_or_else(|| Error::partial_not_found(partial))?;
                appender.check(partial, &guard.participants[idx].service)?;
                // An empty topic has no receipt (one is written with its
                // commands), so a first append needs no lookup.
                if let Some(key) = key
                    && guard.participants[idx].command_count > 0
                    && let Some(r) = self.store.find_receipt(partial, key).await?
                {
                    return check_receipt(r, n, digest, key).map(|r| (r, true));
                }
                self.expire_if_due(&live, &mut guard).await?;
                let mut next = guard.clone();
                apply(&mut next, Event::Append { participant: idx, commands: n, bytes }, self.clock.now_ms())?;
                let p = &next.participants[idx];
                if p.topic_bytes > self.limits.max_topic_bytes {
                    return Err(Error::LimitExceeded(format!(
                        "partial topic {partial} would hold {} bytes; the limit is {}",
                        p.topic_bytes, self.limits.max_topic_bytes
                    )));
                }
                let first = p.command_count - n + 1;
                for (record, sequence) in records.iter_mut().zip(first..) {
                    record.sequence = sequence;
                }
                let receipt = AppendReceipt { first_sequence: first, last_sequence: first + n - 1, bytes, digest };
                let batch =
                    AppendBatch { partial_id: partial, commands: &records, idempotency: key.map(|k| (k, receipt)) };
                self.write(&live, &mut guard, next, How::Append(batch)).await?;
                tracing::debug!(txn = %id, %partial, first, count = n, "commands appended");
                Ok((receipt, false))
            }
            .await
        )
    }

    /// Reads a topic from `from` (0 or 1 = start), at most `limit` commands
    /// (0 = the maximum). Returns the transaction and the participant too,
    /// read together with the commands (under the lock while live), so the
    /// participant's `command_count` matches what was read.
    pub async fn read_topic(
        &self,
        partial: PartialId,
        from: u64,
        limit: usize,
    ) -> Result<(TxnRecord, ParticipantRecord, Vec<CommandRecord>)> {
        let id = self.txn_of(partial).await?;
        let limit = if limit == 0 { fixed::MAX_PAGE } else { limit.min(fixed::MAX_PAGE) };
        let (txn, commands) = match self.find(id).await? {
            Found::Live(live) => {
                let guard = live.record.lock().await;
                let commands = self.store.read_topic(partial, from.max(1), limit).await?;
                (guard.clone(), commands)
            }
            Found::Finished(txn) => {
                let commands = self.store.read_topic(partial, from.max(1), limit).await?;
                (txn, commands)
            }
        };
        let participant = txn
            .participants
            .iter()
            .find(|p| p.partial_id == partial)
            .cloned()
            .ok_or_else(|| Error::partial_not_found(partial))?;
        Ok((txn, participant, commands))
    }

    /// Every command of a topic, in order: what a phase-2 call carries. A
    /// decided topic never changes, so no lock is needed.
    pub async fn commands(&self, partial: PartialId) -> Result<Vec<CommandRecord>> {
        self.store.read_topic(partial, 1, usize::MAX).await
    }

    /// The transaction a partial id belongs to: from [`Engine::partials`]
    /// (a partial id never moves to another transaction, so a cached
    /// answer is never wrong; one of a collected transaction leads to
    /// NOT_FOUND when the record is read), else from the store.
    async fn txn_of(&self, partial: PartialId) -> Result<TxnId> {
        if let Some(id) = lock(&self.partials).get(&partial) {
            return Ok(*id);
        }
        let id = self.store.find_partial(partial).await?.ok_or_else(|| Error::partial_not_found(partial))?;
        self.remember_partials(id, [partial]);
        Ok(id)
    }
}

/// A receipt answers a retry only if the retry carries the same batch.
fn check_receipt(r: AppendReceipt, count: u64, digest: u64, key: &str) -> Result<AppendReceipt> {
    if r.last_sequence - r.first_sequence + 1 != count || r.digest != digest {
        return Err(Error::invalid(format!(
            "idempotency_key {key:?} was already used for a different batch ({} commands, {} bytes)",
            r.last_sequence - r.first_sequence + 1,
            r.bytes
        )));
    }
    Ok(r)
}
