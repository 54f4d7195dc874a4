//! Who is calling, and what they may do.
//!
//! Without `--policy` the coordinator runs *open*: every caller may do
//! everything, as on a developer's loopback (the server then refuses to
//! listen beyond loopback without TLS unless `--insecure` is given). With
//! `--policy`, every call of the tcc services needs an identity, from the
//! client certificate ([`tls`], [`tcc_proto::identity`]) or from a bearer
//! token in the tokens file ([`policy::Tokens`]); health, reflection and
//! `/metrics` stay open. The rules, checked by the API handlers through
//! [`Access`]:
//!
//! | who                   | may                                                                  |
//! |-----------------------|----------------------------------------------------------------------|
//! | any identity *S*      | register/deregister endpoints of service *S*; append to and read partial topics of service *S* |
//! | a composite (`own`)   | begin; enlist, confirm, cancel and get the transactions it began     |
//! | a composite (`all`)   | the same on every transaction                                        |
//! | an admin              | `Admin.*`, `Registry.ListEndpoints`; get and cancel any transaction; read any topic; deregister any endpoint |
//!
//! A refusal is UNAUTHENTICATED (no identity, or one that does not hold
//! up) or PERMISSION_DENIED (a known identity that the rule does not
//! allow), with a message naming the identity and the rule; every refusal
//! is logged at WARN and counted (`tcc_auth_refusals_total`).

pub mod policy;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::model::{PartialId, TxnRecord};
use policy::{Policy, Scope, Tokens};
use tls::Tls;

/// What the TLS handshake learnt about a connection's client certificate;
/// a request extension set by [`crate::net`].
#[derive(Clone, Debug, Default)]
pub enum PeerCert {
    /// No client certificate (plaintext, or TLS without one).
    #[default]
    None,
    /// A verified certificate naming this identity.
    Named(Arc<str>),
    /// A verified certificate that names no usable identity, and why.
    Unnamed(Arc<str>),
}

/// The caller of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The coordinator runs open: anyone may do anything.
    Anyone,
    /// An authenticated identity and its roles.
    Known {
        /// The identity (and the name of its service).
        name: String,
        /// In the policy's `admin` list.
        admin: bool,
        /// In the policy's `composite` table.
        composite: Option<Scope>,
        /// The connection's peer, for the log.
        peer: Option<SocketAddr>,
    },
}

/// What a transaction operation needs; see the table in the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnAction {
    /// Enlist or Confirm: the composite that owns it.
    Drive,
    /// Cancel: the composite that owns it, or an admin.
    Cancel,
    /// Get: the composite that owns it, or an admin.
    Read,
}

/// The policy in force; see the module docs.
#[derive(Debug)]
pub struct Access {
    rules: Option<Rules>,
}

#[derive(Debug)]
struct Rules {
    policy_file: PathBuf,
    tokens_file: Option<PathBuf>,
    policy: RwLock<Arc<Policy>>,
    tokens: RwLock<Arc<Tokens>>,
    /// The files' content when last loaded.
    seen: Mutex<(String, String)>,
}

fn read(path: &PathBuf, flag: &str) -> std::result::Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
}

impl Access {
    /// Everyone may do everything.
    pub fn open() -> Access {
        Access { rules: None }
    }

    /// Enforces the policy in `policy_file`, with the tokens of
    /// `tokens_file`. The error names the file and the bad entry.
    pub fn enforced(policy_file: PathBuf, tokens_file: Option<PathBuf>) -> std::result::Result<Access, String> {
        let policy_text = read(&policy_file, "--policy")?;
        let policy = Policy::parse(&policy_text).map_err(|e| format!("--policy {}: {e}", policy_file.display()))?;
        let (tokens_text, tokens) = match &tokens_file {
            None => (String::new(), Tokens::default()),
            Some(path) => {
                let text = read(path, "--tokens")?;
                let tokens = Tokens::parse(&text).map_err(|e| format!("--tokens {}: {e}", path.display()))?;
                (text, tokens)
            }
        };
        Ok(Access {
            rules: Some(Rules {
                policy_file,
                tokens_file,
                policy: RwLock::new(Arc::new(policy)),
                tokens: RwLock::new(Arc::new(tokens)),
                seen: Mutex::new((policy_text, tokens_text)),
            }),
        })
    }

    /// Whether a policy is enforced.
    pub fn is_enforced(&self) -> bool {
        self.rules.is_some()
    }

    /// A line for the start-up log.
    pub fn summary(&self) -> String {
        match &self.rules {
            None => "open (no --policy): every caller may do everything".to_string(),
            Some(r) => {
                let (admins, composites) = current(&r.policy).counts();
                format!(
                    "enforced: policy {} ({admins} admin, {composites} composite identities), {} bearer token(s)",
                    r.policy_file.display(),
                    current(&r.tokens).len()
                )
            }
        }
    }

    /// Reads the policy and tokens files again if they changed. `Ok(true)`
    /// when new rules are in force; an error (the old rules stay) when the
    /// new content does not parse.
    pub fn reload_if_changed(&self) -> std::result::Result<bool, String> {
        let Some(r) = &self.rules else { return Ok(false) };
        let policy_text = read(&r.policy_file, "--policy")?;
        let tokens_text = match &r.tokens_file {
            None => String::new(),
            Some(path) => read(path, "--tokens")?,
        };
        {
            let mut seen = crate::lock(&r.seen);
            if seen.0 == policy_text && seen.1 == tokens_text {
                return Ok(false);
            }
            *seen = (policy_text.clone(), tokens_text.clone());
        }
        let policy = Policy::parse(&policy_text).map_err(|e| format!("--policy {}: {e}", r.policy_file.display()))?;
        let tokens = match &r.tokens_file {
            None => Tokens::default(),
            Some(path) => Tokens::parse(&tokens_text).map_err(|e| format!("--tokens {}: {e}", path.display()))?,
        };
        *r.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        *r.tokens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
        Ok(true)
    }

    /// Who is calling `rpc` (e.g. "Transactions.Begin"). UNAUTHENTICATED
    /// when a policy is enforced and the request carries no identity that
    /// holds up.
    pub fn caller<T>(&self, request: &tonic::Request<T>, rpc: &'static str) -> Result<Caller> {
        let authorization = request.metadata().get("authorization").map(|v| v.to_str().unwrap_or(""));
        self.identify(request.extensions(), authorization, request.remote_addr(), rpc)
    }

    /// [`Access::caller`] for a plain HTTP request (the console): the same
    /// identities, from the same client certificate or bearer token.
    pub fn http_caller(&self, parts: &http::request::Parts, rpc: &'static str) -> Result<Caller> {
        let authorization = parts.headers.get(http::header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
        let peer =
            parts.extensions.get::<tonic::transport::server::TcpConnectInfo>().and_then(|info| info.remote_addr());
        self.identify(&parts.extensions, authorization, peer, rpc)
    }

    /// Who is calling, from the connection's client certificate (a
    /// [`PeerCert`] extension) and the `authorization` header, if any (an
    /// unreadable header is given as "").
    fn identify(
        &self,
        extensions: &http::Extensions,
        authorization: Option<&str>,
        peer: Option<SocketAddr>,
        rpc: &'static str,
    ) -> Result<Caller> {
        let Some(r) = &self.rules else { return Ok(Caller::Anyone) };
        let refuse = |why: String| refused(Error::Unauthenticated(format!("{rpc}: {why}")), rpc, None, peer);
        let cert = extensions.get::<PeerCert>().cloned().unwrap_or_default();
        let token = match authorization {
            None => None,
            Some(value) => {
                // The scheme is case-insensitive (RFC 7235).
                let text = Some(value).and_then(|v| {
                    let (scheme, token) = v.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                });
                let Some(token) = text else {
                    return Err(refuse("the authorization header is not `Bearer <token>`".to_string()));
                };
                match current(&r.tokens).identity(token) {
                    Some(name) => Some(name.to_string()),
                    None => return Err(refuse("the bearer token is not in the tokens file".to_string())),
                }
            }
        };
        let name = match (cert, token) {
            (PeerCert::Unnamed(why), _) => {
                return Err(refuse(format!("the client certificate names no usable identity: {why}")));
            }
            (PeerCert::Named(c), Some(t)) if *c != *t => {
                return Err(refuse(format!(
                    "the client certificate names {c:?} but the bearer token stands for {t:?}"
                )));
            }
            (PeerCert::Named(c), _) => c.to_string(),
            (PeerCert::None, Some(t)) => t,
            (PeerCert::None, None) => {
                return Err(refuse(
                    "no identity: present a client certificate signed by the configured CA (--tls-client-ca), or an `authorization: Bearer <token>` listed in the tokens file"
                        .to_string(),
                ));
            }
        };
        let policy = current(&r.policy);
        Ok(Caller::Known { admin: policy.is_admin(&name), composite: policy.composite(&name), name, peer })
    }

    /// Admin only.
    pub fn admin(&self, caller: &Caller, rpc: &'static str) -> Result<()> {
        match caller {
            Caller::Known { admin: false, name, peer, .. } => Err(denied(
                format!("identity {name:?} may not call {rpc}: it needs the admin role (the policy's `admin` list)"),
                rpc,
                name,
                *peer,
            )),
            _ => Ok(()),
        }
    }

    /// Begin: composites only. Returns the owner to record on the
    /// transaction (empty when open).
    pub fn begin(&self, caller: &Caller, rpc: &'static str) -> Result<String> {
        match caller {
            Caller::Anyone => Ok(String::new()),
            Caller::Known { composite: Some(_), name, .. } => Ok(name.clone()),
            Caller::Known { name, peer, .. } => Err(denied(
                format!(
                    "identity {name:?} may not begin transactions: it is not a composite (the policy's `composite` table)"
                ),
                rpc,
                name,
                *peer,
            )),
        }
    }

    /// An operation on an existing transaction; see [`TxnAction`].
    pub fn transaction(&self, caller: &Caller, rpc: &'static str, action: TxnAction, txn: &TxnRecord) -> Result<()> {
        let Caller::Known { name, admin, composite, peer } = caller else { return Ok(()) };
        let owns = match composite {
            Some(Scope::All) => true,
            Some(Scope::Own) => !txn.owner.is_empty() && txn.owner == *name,
            None => false,
        };
        if owns || (*admin && action != TxnAction::Drive) {
            return Ok(());
        }
        if !*admin {
            // One that may not even read it learns nothing of it, not even
            // that it exists: the answer for an id never begun. The
            // refusal is logged and counted all the same.
            let why = format!("identity {name:?} may not call {rpc} on transaction {}: not its own", txn.id);
            refused(Error::PermissionDenied(why), rpc, Some(name), *peer);
            return Err(Error::txn_not_found(txn.id));
        }
        let rule = match (composite, action) {
            (None, TxnAction::Drive) => "only the composite that began a transaction drives it".to_string(),
            (None, _) => "only the composite that began a transaction, or an admin, may do this".to_string(),
            (Some(_), _) => format!(
                "a composite with scope \"own\" acts only on the transactions it began, and this one was begun by {}",
                if txn.owner.is_empty() {
                    "no identity (before the policy was on)".to_string()
                } else {
                    format!("{:?}", txn.owner)
                }
            ),
        };
        Err(denied(format!("identity {name:?} may not call {rpc} on transaction {}: {rule}", txn.id), rpc, name, *peer))
    }

    /// An operation on `service`'s partial topics or endpoints: that
    /// service itself, or (with `admin_too`) an admin.
    pub fn service(&self, caller: &Caller, rpc: &'static str, service: &str, admin_too: bool) -> Result<()> {
        let Caller::Known { name, admin, peer, .. } = caller else { return Ok(()) };
        if name == service || (admin_too && *admin) {
            return Ok(());
        }
        Err(denied(
            format!(
                "identity {name:?} may not call {rpc} for service {service:?}: a service acts only on its own partials and endpoints"
            ),
            rpc,
            name,
            *peer,
        ))
    }

    /// An operation on a partial topic of `service`: that service itself,
    /// or (with `admin_too`) an admin. Anyone else is answered as for a
    /// partial that does not exist (refusal logged and counted).
    pub fn partial(
        &self,
        caller: &Caller,
        rpc: &'static str,
        partial: PartialId,
        service: &str,
        admin_too: bool,
    ) -> Result<()> {
        let Caller::Known { name, admin, peer, .. } = caller else { return Ok(()) };
        if name == service || (admin_too && *admin) {
            return Ok(());
        }
        let why = format!("identity {name:?} may not call {rpc} on partial transaction {partial}: not its own");
        refused(Error::PermissionDenied(why), rpc, Some(name), *peer);
        Err(Error::partial_not_found(partial))
    }

    /// The most endpoints `caller` may have registered, if limited.
    pub fn endpoint_quota(&self, caller: &Caller) -> Option<usize> {
        match (caller, &self.rules) {
            (Caller::Known { .. }, Some(r)) => Some(current(&r.policy).max_endpoints_per_identity),
            _ => None,
        }
    }

    /// Logs and counts a refusal decided elsewhere (a quota).
    pub fn refuse(&self, caller: &Caller, rpc: &'static str, error: Error) -> Error {
        match caller {
            Caller::Known { name, peer, .. } => refused(error, rpc, Some(name), *peer),
            Caller::Anyone => error,
        }
    }
}

fn current<T>(lock: &RwLock<Arc<T>>) -> Arc<T> {
    lock.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn denied(message: String, rpc: &'static str, name: &str, peer: Option<SocketAddr>) -> Error {
    refused(Error::PermissionDenied(message), rpc, Some(name), peer)
}

/// Every refusal goes through here: logged at WARN, counted.
fn refused(error: Error, rpc: &'static str, identity: Option<&str>, peer: Option<SocketAddr>) -> Error {
    let code = match &error {
        Error::Unauthenticated(_) => "unauthenticated",
        Error::PermissionDenied(_) => "permission_denied",
        _ => "quota",
    };
    tracing::warn!(rpc, identity = identity.unwrap_or("-"), peer = ?peer, code, reason = %error, "request refused");
    crate::metrics::auth_refused(code);
    error
}

/// Until `shutdown`: every [`tls::RELOAD_EVERY`], reads the certificates,
/// the policy and the tokens again if their files changed, and logs what
/// happened.
pub async fn watch(tls: Option<Arc<Tls>>, access: Arc<Access>, shutdown: CancellationToken) {
    let mut failing = (false, false);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tls::RELOAD_EVERY) => {}
        }
        if let Some(tls) = &tls {
            match tls.reload_if_changed() {
                Ok(true) => {
                    failing.0 = false;
                    tracing::info!("TLS certificates reloaded; new connections use them");
                }
                Ok(false) => {}
                Err(e) if !failing.0 => {
                    failing.0 = true;
                    tracing::error!(cause = %e, "cannot reload the TLS certificates; still using the previous ones");
                }
                Err(_) => {}
            }
        }
        match access.reload_if_changed() {
            Ok(true) => {
                failing.1 = false;
                tracing::info!(access = %access.summary(), "policy reloaded");
            }
            Ok(false) => {}
            Err(e) if !failing.1 => {
                failing.1 = true;
                tracing::error!(cause = %e, "cannot reload the policy or tokens; the previous rules stay in force");
            }
            Err(_) => {}
        }
    }
}
