//! Request validation: names, sizes and ranges, each failing with an
//! `INVALID_ARGUMENT` whose message says which field broke which rule.

use std::collections::HashSet;

use crate::config::{Limits, fixed};
use crate::error::{Error, Result};

/// A command as a client sends it, before it gets a sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCommand {
    /// Type name.
    pub kind: String,
    /// Entity key (may be empty).
    pub key: String,
    /// Opaque payload.
    pub payload: Vec<u8>,
}

/// Checks a participant service name: 1..=128 of `[A-Za-z0-9._-]`.
pub fn service_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!("{field} must not be empty")));
    }
    if name.len() > fixed::MAX_SERVICE_NAME {
        return Err(Error::invalid(format!(
            "{field} is {} bytes long; the limit is {}",
            name.len(),
            fixed::MAX_SERVICE_NAME
        )));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(Error::invalid(format!(
            "{field} {name:?} contains {c:?}; allowed are ASCII letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// Checks Begin's participant list.
pub fn participants(limits: &Limits, services: &[String]) -> Result<()> {
    if services.is_empty() {
        return Err(Error::invalid("participants must name at least one service"));
    }
    if services.len() > limits.max_participants {
        return Err(Error::invalid(format!(
            "{} participants requested; the limit is {}",
            services.len(),
            limits.max_participants
        )));
    }
    let mut seen = HashSet::new();
    for (i, s) in services.iter().enumerate() {
        service_name(&format!("participants[{i}]"), s)?;
        if !seen.insert(s.as_str()) {
            return Err(Error::invalid(format!("participant {s:?} is listed twice")));
        }
    }
    Ok(())
}

/// Resolves Begin's timeout (0 = default) and checks its range.
pub fn timeout_ms(limits: &Limits, requested: u64) -> Result<u64> {
    if requested == 0 {
        return Ok(limits.default_timeout_ms);
    }
    if requested < limits.min_timeout_ms || requested > limits.max_timeout_ms {
        return Err(Error::invalid(format!(
            "timeout_ms {requested} is out of range; allowed are {}..={} (or 0 for the default {})",
            limits.min_timeout_ms, limits.max_timeout_ms, limits.default_timeout_ms
        )));
    }
    Ok(requested)
}

/// Bytes a command is accounted for in its topic: type, key and payload plus
/// a fixed overhead for framing, so that a topic's size bounds the size of
/// the phase-2 message that carries it.
pub fn accounted_bytes(c: &NewCommand) -> u64 {
    (c.kind.len() + c.key.len() + c.payload.len()) as u64 + COMMAND_OVERHEAD
}

/// Framing overhead accounted per command (sequence, tags, lengths).
pub const COMMAND_OVERHEAD: u64 = 16;

/// Checks an append batch; returns its accounted bytes (see
/// [`accounted_bytes`]).
pub fn commands(limits: &Limits, commands: &[NewCommand]) -> Result<u64> {
    if commands.is_empty() {
        return Err(Error::invalid("commands must hold at least one command"));
    }
    if commands.len() > limits.max_commands_per_append {
        return Err(Error::invalid(format!(
            "{} commands in one append; the limit is {}",
            commands.len(),
            limits.max_commands_per_append
        )));
    }
    let mut bytes = 0u64;
    for (i, c) in commands.iter().enumerate() {
        if c.kind.is_empty() {
            return Err(Error::invalid(format!("commands[{i}].type must not be empty")));
        }
        if c.kind.len() > fixed::MAX_COMMAND_TYPE {
            return Err(Error::invalid(format!(
                "commands[{i}].type is {} bytes long; the limit is {}",
                c.kind.len(),
                fixed::MAX_COMMAND_TYPE
            )));
        }
        if let Some((field, _)) = [("type", &c.kind), ("key", &c.key)].into_iter().find(|(_, t)| t.contains('\0')) {
            return Err(Error::invalid(format!(
                "commands[{i}].{field} contains a NUL character, which is not allowed"
            )));
        }
        if c.key.len() > fixed::MAX_COMMAND_KEY {
            return Err(Error::invalid(format!(
                "commands[{i}].key is {} bytes long; the limit is {}",
                c.key.len(),
                fixed::MAX_COMMAND_KEY
            )));
        }
        let size = c.kind.len() + c.key.len() + c.payload.len();
        if size > limits.max_command_bytes {
            return Err(Error::invalid(format!(
                "commands[{i}] is {size} bytes; the limit is {} bytes per command",
                limits.max_command_bytes
            )));
        }
        bytes += accounted_bytes(c);
    }
    Ok(bytes)
}

/// A digest of a batch's content: the first 8 bytes of a SHA-256 over the
/// length-prefixed type, key and payload of every command.
pub fn digest(commands: &[NewCommand]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in commands.iter().flat_map(|c| [c.kind.as_bytes(), c.key.as_bytes(), c.payload.as_slice()]) {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

/// Checks an idempotency key; empty means none.
pub fn idempotency_key(key: &str) -> Result<Option<&str>> {
    if key.len() > fixed::MAX_IDEMPOTENCY_KEY {
        return Err(Error::invalid(format!(
            "idempotency_key is {} bytes long; the limit is {}",
            key.len(),
            fixed::MAX_IDEMPOTENCY_KEY
        )));
    }
    if key.contains('\0') {
        return Err(Error::invalid("idempotency_key contains a NUL character, which is not allowed"));
    }
    Ok((!key.is_empty()).then_some(key))
}

/// Checks a cancel reason.
pub fn reason(reason: &str) -> Result<()> {
    if reason.len() > fixed::MAX_REASON {
        return Err(Error::invalid(format!(
            "reason is {} bytes long; the limit is {}",
            reason.len(),
            fixed::MAX_REASON
        )));
    }
    Ok(())
}
