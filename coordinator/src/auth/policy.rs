//! The policy file and the tokens file: who is an operator, who is a
//! composite, how many endpoints an identity may register, and which
//! bearer tokens stand for which identity.
//!
//! The policy file (`--policy`, TOML):
//!
//! ```toml
//! # Identities that may call Admin and Registry.ListEndpoints, and read
//! # or cancel any transaction.
//! admin = ["ops"]
//! # Identities that may begin composite transactions: "own" drives and
//! # reads only the transactions it began, "all" every transaction.
//! [composite]
//! shop = "own"
//! backoffice = "all"
//! # Most endpoints one identity may have registered at once (default 16).
//! max_endpoints_per_identity = 16
//! ```
//!
//! Every identity, listed or not, is also the domain service of its own
//! name. Unknown keys are refused, so a misspelt rule cannot silently
//! grant or withhold anything.
//!
//! The tokens file (`--tokens`): one `IDENTITY TOKEN` pair per line, `#`
//! starts a comment. A token is at least [`MIN_TOKEN_LEN`] characters.
//! Only a SHA-256 digest of each token is kept in memory, and a presented
//! token is looked up by its digest, so the comparison leaks nothing about
//! the tokens through its timing.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use tcc_proto::identity;

/// The shortest token accepted in the tokens file.
pub const MIN_TOKEN_LEN: usize = 16;

/// The default of `max_endpoints_per_identity`.
pub const DEFAULT_MAX_ENDPOINTS_PER_IDENTITY: usize = 16;

/// What a composite identity may drive and read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The transactions it began.
    Own,
    /// Every transaction.
    All,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    admin: Vec<String>,
    #[serde(default)]
    composite: BTreeMap<String, Scope>,
    #[serde(default)]
    max_endpoints_per_identity: Option<usize>,
}

/// A parsed policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    admin: HashSet<String>,
    composite: HashMap<String, Scope>,
    /// Most endpoints one identity may have registered at once.
    pub max_endpoints_per_identity: usize,
}

impl Policy {
    /// Parses a policy file's text; the error names the bad entry.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        for name in file.admin.iter().chain(file.composite.keys()) {
            identity::check(name)?;
        }
        let max = file.max_endpoints_per_identity.unwrap_or(DEFAULT_MAX_ENDPOINTS_PER_IDENTITY);
        if max == 0 {
            return Err("max_endpoints_per_identity must be at least 1".to_string());
        }
        Ok(Policy {
            admin: file.admin.into_iter().collect(),
            composite: file.composite.into_iter().collect(),
            max_endpoints_per_identity: max,
        })
    }

    /// Whether `name` is an operator.
    pub fn is_admin(&self, name: &str) -> bool {
        self.admin.contains(name)
    }

    /// What `name` may do as a composite, if it is one.
    pub fn composite(&self, name: &str) -> Option<Scope> {
        self.composite.get(name).copied()
    }

    /// The numbers of admin and composite identities, for the log.
    pub fn counts(&self) -> (usize, usize) {
        (self.admin.len(), self.composite.len())
    }
}

/// A parsed tokens file: SHA-256 of each token → its identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], String>,
}

impl Tokens {
    /// Parses a tokens file's text; the error names the line (never the
    /// token).
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut by_digest = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(name), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("line {}: expected `IDENTITY TOKEN`", i + 1));
            };
            identity::check(name).map_err(|e| format!("line {}: {e}", i + 1))?;
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {}: the token of {name:?} is shorter than {MIN_TOKEN_LEN} characters",
                    i + 1
                ));
            }
            if by_digest.insert(digest(token), name.to_string()).is_some() {
                return Err(format!("line {}: this token is already listed for another identity", i + 1));
            }
        }
        Ok(Tokens { by_digest })
    }

    /// The identity a presented token stands for.
    pub fn identity(&self, token: &str) -> Option<&str> {
        self.by_digest.get(&digest(token)).map(String::as_str)
    }

    /// How many tokens are listed.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_parses_and_unknown_keys_are_refused() -> Result<(), String> {
        let p = Policy::parse(
            "admin = [\"ops\"]\nmax_endpoints_per_identity = 3\n[composite]\nshop = \"own\"\nbo = \"all\"\n",
        )?;
        assert!(p.is_admin("ops") && !p.is_admin("shop"));
        assert_eq!(
            (p.composite("shop"), p.composite("bo"), p.composite("ops")),
            (Some(Scope::Own), Some(Scope::All), None)
        );
        assert_eq!(p.max_endpoints_per_identity, 3);
        assert_eq!(Policy::parse("")?.max_endpoints_per_identity, DEFAULT_MAX_ENDPOINTS_PER_IDENTITY);
        for bad in [
            "admins = [\"ops\"]",
            "[composite]\nshop = \"some\"",
            "admin = [\"a b\"]",
            "max_endpoints_per_identity = 0",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad:?} should be refused");
        }
        Ok(())
    }

    #[test]
    fn tokens_are_looked_up_by_digest_and_weak_ones_refused() -> Result<(), String> {
        let t = Tokens::parse("# ops\nops  0123456789abcdef0123 # trailing comment\n\nshop fedcba9876543210fedc\n")?;
        assert_eq!(t.len(), 2);
        assert_eq!(t.identity("0123456789abcdef0123"), Some("ops"));
        assert_eq!(t.identity("fedcba9876543210fedc"), Some("shop"));
        assert_eq!(t.identity("0123456789abcdef012"), None);
        let short = Tokens::parse("ops short").err().unwrap_or_default();
        assert!(short.contains("line 1") && !short.contains("short\""), "{short}");
        assert!(Tokens::parse("ops").is_err());
        assert!(Tokens::parse("a 0123456789abcdef0123\nb 0123456789abcdef0123").is_err());
        Ok(())
    }
}
