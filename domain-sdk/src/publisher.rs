//! The try phase: collect the commands a handler produces and publish them
//! to the partial topic in one append.
//!
//! Commands are typed: any serde type implementing [`Command`] (which names
//! its type) is encoded as JSON. [`Publisher::send`] makes one `Append` with
//! an idempotency key derived from the partial id and the batch's content,
//! so a retried request that produces the same commands is stored once; use
//! [`Publisher::with_key`] to choose the key yourself.
//!
//! If the transaction was already decided (cancelled, timed out, confirmed)
//! the append is refused and `send` returns [`Error::Decided`]: nothing was
//! published, and the handler must not keep anything it reserved (the
//! reservation helpers refuse such holds up front).

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tcc_proto::v1;

use crate::composite::Coordinator;
use crate::error::{Error, Result};
use crate::propagation::PartialContext;

/// A typed command: a serde type with a stable type name.
pub trait Command: Serialize + DeserializeOwned {
    /// The type name stored with the command, e.g. `"customers.Debit"`.
    const TYPE: &'static str;
}

/// What an append stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// Sequence of the first command.
    pub first_sequence: u64,
    /// Sequence of the last command.
    pub last_sequence: u64,
    /// True when an earlier identical try had already stored them.
    pub duplicate: bool,
}

/// Collects commands for one partial transaction.
#[derive(Debug)]
pub struct Publisher {
    coordinator: Coordinator,
    service: String,
    ctx: PartialContext,
    commands: Vec<v1::Command>,
    key: Option<String>,
}

impl Publisher {
    /// A publisher for the partial `ctx` of `service` (this service's
    /// participant name): the coordinator refuses the append if the partial
    /// belongs to another service.
    pub fn new(coordinator: &Coordinator, service: &str, ctx: PartialContext) -> Self {
        Publisher {
            coordinator: coordinator.clone(),
            service: service.to_string(),
            ctx,
            commands: Vec::new(),
            key: None,
        }
    }

    /// Uses `key` as the idempotency key instead of the content hash.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a command about entity `key` (may be empty).
    pub fn publish<C: Command>(&mut self, key: &str, command: &C) -> Result<()> {
        self.commands.push(v1::Command {
            r#type: C::TYPE.to_string(),
            key: key.to_string(),
            payload: serde_json::to_vec(command)?,
        });
        Ok(())
    }

    /// The commands collected so far.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// True when nothing was published.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Sends every collected command in one durable append. Sending nothing
    /// is a no-op.
    pub async fn send(self) -> Result<Published> {
        if self.commands.is_empty() {
            return Ok(Published { first_sequence: 0, last_sequence: 0, duplicate: false });
        }
        let key = self.key.clone().unwrap_or_else(|| content_key(&self.ctx.partial_id, &self.commands));
        let req = v1::AppendRequest {
            partial_id: self.ctx.partial_id.clone(),
            commands: self.commands,
            idempotency_key: key,
            service: self.service,
        };
        match self.coordinator.topics.clone().append(req).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok(Published {
                    first_sequence: r.first_sequence,
                    last_sequence: r.last_sequence,
                    duplicate: r.duplicate,
                })
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Err(Error::Decided(s.message().to_string())),
            Err(s) => Err(s.into()),
        }
    }
}

/// `sha256:` + hex of the partial id and every command (length-prefixed).
fn content_key(partial: &str, commands: &[v1::Command]) -> String {
    let mut h = Sha256::new();
    for part in std::iter::once(partial.as_bytes())
        .chain(commands.iter().flat_map(|c| [c.r#type.as_bytes(), c.key.as_bytes(), c.payload.as_slice()]))
    {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(t: &str, k: &str, p: &[u8]) -> v1::Command {
        v1::Command { r#type: t.into(), key: k.into(), payload: p.to_vec() }
    }

    #[test]
    fn content_key_is_stable_and_sensitive() {
        let a = content_key("p", &[cmd("t", "k", b"1")]);
        assert_eq!(a, content_key("p", &[cmd("t", "k", b"1")]));
        assert_ne!(a, content_key("q", &[cmd("t", "k", b"1")]));
        assert_ne!(a, content_key("p", &[cmd("t", "k", b"2")]));
        assert_ne!(content_key("p", &[cmd("ab", "", b"")]), content_key("p", &[cmd("a", "b", b"")]));
        assert!(a.len() <= 128);
    }
}
