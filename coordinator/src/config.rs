//! Configuration: command-line flags, each also settable by a `TCC_*`
//! environment variable and in a TOML file (`--config`). Every setting has
//! a default, so the coordinator runs with no configuration at all.
//!
//! Precedence, highest first: a flag on the command line, its environment
//! variable, the `--config` file, the default. The file's keys are the
//! flags' long names (`max-participants = 64`, or `max_participants`); a
//! switch is `true`; a repeatable flag takes an array. `coordinator/ops/tcc.toml`
//! lists every setting with its default and meaning (a test keeps it
//! complete). Each value goes through the flag's own parser, so the file
//! and the command line accept exactly the same values.
//!
//! The same structs are the library's configuration: `Config::default()` is
//! what the binary runs with when given no flags.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser};

/// The coordinator's configuration.
#[derive(Clone, Debug, Parser)]
#[command(name = "tcc-coordinator", version, about = "TCC composite-transaction coordinator")]
pub struct Config {
    /// Settings file (TOML; keys are these flags' long names). Flags and
    /// environment variables override it.
    #[arg(long, env = "TCC_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on for gRPC (all services, health and reflection):
    /// IP:PORT, or HOST:PORT for a host name this machine resolves
    /// (localhost:50051).
    #[arg(long, env = "TCC_LISTEN", default_value = "127.0.0.1:50051", value_parser = parse_addr)]
    pub listen: SocketAddr,

    /// Directory of the embedded sled database (created if missing).
    #[arg(long, env = "TCC_DATA_DIR", default_value = "tcc-data")]
    pub data_dir: PathBuf,

    /// Start even though the journal in --data-dir is damaged: keep the
    /// writes before the damage and drop the rest (the damaged journal
    /// files are kept aside as *.damaged). Without it, a damaged journal
    /// stops the start, saying what this would drop.
    #[arg(long, env = "TCC_SALVAGE_JOURNAL")]
    pub salvage_journal: bool,

    /// PostgreSQL database shared by a cluster of coordinators, as
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (cluster mode). Without it
    /// the coordinator runs alone on the embedded store in --data-dir.
    #[arg(long, env = "TCC_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,

    /// Cluster mode: how long a coordinator's lease in the database lasts
    /// without renewal, in ms (renewed every third of it). When a
    /// coordinator dies, the others take over its deadlines and deliveries
    /// once its lease has lapsed; a coordinator paused for longer is fenced.
    #[arg(long, env = "TCC_LEASE_MS", default_value_t = 5_000)]
    pub lease_ms: u64,

    /// Static participant endpoint, as SERVICE=URI (e.g.
    /// orders=http://127.0.0.1:7001). Repeat the flag, or separate with
    /// commas in the environment variable, for several.
    #[arg(long = "participant", env = "TCC_PARTICIPANTS", value_delimiter = ',', value_name = "SERVICE=URI")]
    pub participants: Vec<String>,

    /// How long finished (CONFIRMED/CANCELLED) transactions and their topics
    /// are kept before garbage collection, in seconds.
    #[arg(long, env = "TCC_RETENTION_SECS", default_value_t = 86_400)]
    pub retention_secs: u64,

    /// At SIGTERM/SIGINT: how long the coordinator may take to stop, in ms.
    /// Waiting Confirm/Cancel calls answer at once with the state reached
    /// so far; in-flight calls and phase-2 calls get until then to finish,
    /// and then the process exits anyway (every acknowledged write is
    /// already durable, so this loses nothing).
    #[arg(long, env = "TCC_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,

    /// Also serve `GET /metrics` over plain HTTP on this address (it is
    /// always served on --listen too, beside gRPC).
    #[arg(long, env = "TCC_HTTP_LISTEN", value_name = "ADDR", value_parser = parse_addr)]
    pub http_listen: Option<SocketAddr>,

    /// Export traces over OTLP/gRPC to this collector (e.g.
    /// http://127.0.0.1:4317): a span per request served and per phase-2
    /// call, joined to the caller's W3C trace context (`traceparent`).
    /// Without it, nothing is traced.
    #[arg(long, env = "TCC_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Log format on stderr: `text` (colour only on a terminal) or `json`
    /// (one object per line). `RUST_LOG` filters, as `info` by default.
    #[arg(long, env = "TCC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// TLS certificate chain of the coordinator (PEM). With --tls-key, the
    /// gRPC port serves TLS only; the files are read again when they change.
    #[arg(long, env = "TCC_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM).
    #[arg(long, env = "TCC_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificate(s) (PEM) that sign the certificates of clients and
    /// participants. Clients must present a certificate it signed (mutual
    /// TLS), and phase-2 calls go over TLS only, to servers whose
    /// certificate it signed for the service being called.
    #[arg(long, env = "TCC_TLS_CLIENT_CA", value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Policy file (TOML) naming the admin and composite identities; with
    /// it, every call needs an identity and least privilege applies (see
    /// SECURITY.md). Without it, every caller may do everything.
    #[arg(long, env = "TCC_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Bearer tokens file (`IDENTITY TOKEN` per line), for clients behind a
    /// proxy that terminates TLS. Needs --policy.
    #[arg(long, env = "TCC_TOKENS", value_name = "FILE", requires = "policy")]
    pub tokens: Option<PathBuf>,

    /// Serve plaintext on a non-loopback --listen address. Without TLS the
    /// coordinator otherwise listens on loopback only: anyone who reaches a
    /// plaintext port can read every command in transit.
    #[arg(long, env = "TCC_INSECURE")]
    pub insecure: bool,

    /// Serve a non-loopback --listen address without --policy: every caller
    /// who can connect may then do everything (register as any service and
    /// receive its commits, decide any transaction). Without it, such a
    /// start is refused.
    #[arg(long, env = "TCC_ALLOW_OPEN_ACCESS")]
    pub allow_open_access: bool,

    /// Limits on client connections.
    #[command(flatten)]
    pub connections: Connections,

    /// Size and time limits on requests.
    #[command(flatten)]
    pub limits: Limits,

    /// Phase-2 delivery: per-call deadline and retries.
    #[command(flatten)]
    pub delivery: DeliveryPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Config::parse_from(["tcc-coordinator"])
    }
}

/// Why the configuration could not be read.
#[derive(Debug)]
pub enum ConfigError {
    /// The command line (or `--help`/`--version`, which clap answers).
    Flags(clap::Error),
    /// The `--config` file: unreadable, not TOML, an unknown key or a bad
    /// value. The message names the file and the key.
    File(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Flags(e) => write!(f, "{e}"),
            ConfigError::File(e) => f.write_str(e),
        }
    }
}

impl Config {
    /// Reads the command line `args` (program name first), the environment
    /// and the `--config` file, with the precedence in the module docs.
    pub fn load_from<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let plain = Config::try_parse_from(&args).map_err(ConfigError::Flags)?;
        let Some(path) = plain.config.clone() else { return Ok(plain) };
        let shown = path.display();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::File(format!("cannot read the settings file {shown} (--config): {e}")))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::File(format!("{shown} is not valid TOML: {}", e.to_string().trim_end()))
        })?;
        let command = Config::command();
        let given: Vec<String> = args.iter().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
        let mut from_file: Vec<OsString> = args.first().cloned().into_iter().collect();
        for (key, value) in &table {
            let long = key.replace('_', "-");
            let arg = command
                .get_arguments()
                .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
                .ok_or_else(|| {
                    let known = command.get_arguments().filter_map(|a| a.get_long()).filter(|l| *l != "config");
                    let hint = closest(&long, known).map(|s| format!("; did you mean {s:?}?")).unwrap_or_default();
                    ConfigError::File(format!(
                        "{shown}: unknown setting {key:?}{hint} (`tcc-coordinator --help` lists the settings, without the leading --)"
                    ))
                })?;
            let flag = format!("--{long}");
            let on_command_line = given.iter().any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
            let in_environment = arg.get_env().is_some_and(|env| std::env::var_os(env).is_some());
            if on_command_line || in_environment {
                continue;
            }
            let bad = |what: &str| ConfigError::File(format!("{shown}: setting {key:?} {what}"));
            let takes_value = arg.get_action().takes_values();
            let values: Vec<&toml::Value> = match value {
                toml::Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            for value in values {
                match (value, takes_value) {
                    (toml::Value::Boolean(true), false) => from_file.push(flag.clone().into()),
                    (toml::Value::Boolean(false), false) => {}
                    (_, false) => return Err(bad("is a switch: give true or false")),
                    (toml::Value::String(s), true) => from_file.push(format!("{flag}={s}").into()),
                    (toml::Value::Integer(n), true) => from_file.push(format!("{flag}={n}").into()),
                    (toml::Value::Float(n), true) => from_file.push(format!("{flag}={n}").into()),
                    (toml::Value::Boolean(b), true) => from_file.push(format!("{flag}={b}").into()),
                    (_, true) => return Err(bad("must be a string, a number, or an array of them")),
                }
            }
        }
        from_file.extend(args.into_iter().skip(1));
        Config::try_parse_from(from_file).map_err(|e| {
            let e = e.to_string();
            ConfigError::File(format!("{shown}: {}", e.trim_end().trim_start_matches("error: ")))
        })
    }

    /// Checks that the settings make sense together; the message names the
    /// flag to fix.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(e) = &self.otlp_endpoint {
            let uri = e.parse::<http::Uri>().ok();
            if !uri.is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()) {
                return Err(format!(
                    "--otlp-endpoint {e:?} is not an http:// or https:// URL of an OTLP/gRPC collector (e.g. http://127.0.0.1:4317)"
                ));
            }
        }
        let l = &self.limits;
        let d = &self.delivery;
        let positive = [
            ("--max-participants", l.max_participants as u64),
            ("--max-commands-per-append", l.max_commands_per_append as u64),
            ("--max-command-bytes", l.max_command_bytes as u64),
            ("--max-topic-bytes", l.max_topic_bytes),
            ("--min-timeout-ms", l.min_timeout_ms),
            ("--call-timeout-ms", d.call_timeout_ms),
            ("--retry-initial-ms", d.retry_initial_ms),
            ("--shutdown-timeout-ms", self.shutdown_timeout_ms),
            ("--max-connections", self.connections.max_connections as u64),
            ("--handshake-timeout-ms", self.connections.handshake_timeout_ms),
            ("--idle-timeout-ms", self.connections.idle_timeout_ms),
            ("--body-timeout-ms", self.connections.body_timeout_ms),
            ("--max-request-bytes", self.connections.max_request_bytes as u64),
            ("--max-connections-per-peer", self.connections.max_connections_per_peer.map_or(1, |n| n as u64)),
        ];
        if !(1_000..=600_000).contains(&self.lease_ms) {
            return Err(format!("--lease-ms ({}) must be between 1000 and 600000", self.lease_ms));
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err("--database-url must start with postgres:// or postgresql://".to_string());
        }
        if self.salvage_journal && self.database_url.is_some() {
            return Err("--salvage-journal is for the embedded store in --data-dir, not --database-url".to_string());
        }
        if self.tls_cert.is_none() && !self.insecure && !self.listen.ip().is_loopback() {
            return Err(format!(
                "--listen {} is not a loopback address and TLS is off: give --tls-cert and --tls-key (and --tls-client-ca), or --insecure to serve plaintext there anyway",
                self.listen
            ));
        }
        if self.policy.is_none() && !self.allow_open_access && !self.listen.ip().is_loopback() {
            return Err(format!(
                "--listen {} is not a loopback address and there is no --policy: anyone who can connect could register as any service, receive its commits and decide any transaction. Give --policy (with --tls-client-ca or --tokens; see SECURITY.md), or --allow-open-access to serve open access there deliberately",
                self.listen
            ));
        }
        if self.policy.is_some() && self.tls_client_ca.is_none() && self.tokens.is_none() {
            return Err(
                "--policy needs a way to identify callers: --tls-client-ca (client certificates) or --tokens (bearer tokens)"
                    .to_string(),
            );
        }
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{flag} must be greater than 0"));
        }
        if !(l.min_timeout_ms <= l.default_timeout_ms && l.default_timeout_ms <= l.max_timeout_ms) {
            return Err(format!(
                "timeouts must satisfy --min-timeout-ms ({}) <= --default-timeout-ms ({}) <= --max-timeout-ms ({})",
                l.min_timeout_ms, l.default_timeout_ms, l.max_timeout_ms
            ));
        }
        if self.connections.max_request_bytes < l.max_append_message_bytes() {
            return Err(format!(
                "--max-request-bytes ({}) must be at least the largest valid append ({} bytes, from --max-topic-bytes and --max-commands-per-append)",
                self.connections.max_request_bytes,
                l.max_append_message_bytes()
            ));
        }
        if d.retry_max_ms < d.retry_initial_ms {
            return Err(format!(
                "--retry-max-ms ({}) must be at least --retry-initial-ms ({})",
                d.retry_max_ms, d.retry_initial_ms
            ));
        }
        if (l.max_command_bytes as u64) > l.max_topic_bytes {
            return Err(format!(
                "--max-command-bytes ({}) must not exceed --max-topic-bytes ({})",
                l.max_command_bytes, l.max_topic_bytes
            ));
        }
        Ok(())
    }

    /// One line of the settings that matter, for the log at start (the
    /// database URL without its password).
    pub fn summary(&self) -> String {
        let store = match &self.database_url {
            Some(url) => format!("database {}", redact_url(url)),
            None => format!("data dir {}", self.data_dir.display()),
        };
        let l = &self.limits;
        let tls = match (&self.tls_cert, &self.tls_client_ca) {
            (None, _) if self.insecure => "plaintext (--insecure)",
            (None, _) => "plaintext",
            (Some(_), None) => "TLS",
            (Some(_), Some(_)) => "mutual TLS",
        };
        format!(
            "{}listen {} ({tls}), {store}, {} static participant(s), retention {} s, timeouts {}..{} ms (default {}), call timeout {} ms, retries {}..{} ms x {}, max connections {}, shutdown within {} ms{}",
            self.config.as_ref().map(|p| format!("settings file {}, ", p.display())).unwrap_or_default(),
            self.listen,
            self.participants.len(),
            self.retention_secs,
            l.min_timeout_ms,
            l.max_timeout_ms,
            l.default_timeout_ms,
            self.delivery.call_timeout_ms,
            self.delivery.retry_initial_ms,
            self.delivery.retry_max_ms,
            self.delivery.retry_max_attempts,
            self.connections.max_connections,
            self.shutdown_timeout_ms,
            self.otlp_endpoint.as_ref().map(|e| format!(", traces to {e}")).unwrap_or_default(),
        )
    }

    /// The cluster lease as a duration.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// The shutdown bound as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// The GC retention as a duration.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_secs)
    }
}

/// The format of the log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Limits on client connections (see the `net` module).
#[derive(Clone, Debug, Args)]
pub struct Connections {
    /// Most client connections open at once; further ones are closed at
    /// once. Also kept 128 below the process's open-file limit.
    #[arg(long, env = "TCC_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Time a new connection has to start HTTP/2 before it is closed, in ms.
    #[arg(long, env = "TCC_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Time a connection may stay open with no request in flight, in ms
    /// (clients reconnect on their next call).
    #[arg(long, env = "TCC_IDLE_TIMEOUT_MS", default_value_t = 300_000)]
    pub idle_timeout_ms: u64,
    /// Most connections open at once from one peer address (default: half
    /// of --max-connections), so that one peer cannot take every slot.
    #[arg(long, env = "TCC_MAX_CONNECTIONS_PER_PEER")]
    pub max_connections_per_peer: Option<usize>,
    /// Time a request has, once its headers are in, to send its whole
    /// body, in ms; past it the request fails with DEADLINE_EXCEEDED.
    /// (HTTP/1 headers themselves must arrive within 30 s.)
    #[arg(long, env = "TCC_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_timeout_ms: u64,
    /// Most bytes of requests held in memory at once, from their first
    /// byte until they are answered. A request that does not fit waits
    /// (its client is held back by flow control) until others are done,
    /// within --body-timeout-ms; one larger than this is refused
    /// (RESOURCE_EXHAUSTED). At least the largest valid append.
    #[arg(long, env = "TCC_MAX_REQUEST_BYTES", default_value_t = 64 << 20)]
    pub max_request_bytes: usize,
}

impl Connections {
    /// The per-peer cap in force: the setting, or half the total, at
    /// least 1 and at most the total.
    pub fn per_peer(&self, max: usize) -> usize {
        self.max_connections_per_peer.unwrap_or(max / 2).clamp(1, max.max(1))
    }
}

/// Limits that keep every request, topic and transaction bounded.
#[derive(Clone, Debug, Args)]
pub struct Limits {
    /// Maximum participants in one transaction (Begin plus Enlist).
    #[arg(long, env = "TCC_MAX_PARTICIPANTS", default_value_t = 32)]
    pub max_participants: usize,
    /// Maximum commands in one Append.
    #[arg(long, env = "TCC_MAX_COMMANDS_PER_APPEND", default_value_t = 1000)]
    pub max_commands_per_append: usize,
    /// Maximum bytes of one command (payload + type + key).
    #[arg(long, env = "TCC_MAX_COMMAND_BYTES", default_value_t = 1 << 20)]
    pub max_command_bytes: usize,
    /// Maximum bytes in one partial topic (type + key + payload + 16 per
    /// command). The default keeps a commit/rollback message under the 4 MiB
    /// that gRPC servers accept by default.
    #[arg(long, env = "TCC_MAX_TOPIC_BYTES", default_value_t = 3 << 20)]
    pub max_topic_bytes: u64,
    /// Default transaction timeout when Begin gives none, in ms.
    #[arg(long, env = "TCC_DEFAULT_TIMEOUT_MS", default_value_t = 30_000)]
    pub default_timeout_ms: u64,
    /// Smallest timeout Begin accepts, in ms.
    #[arg(long, env = "TCC_MIN_TIMEOUT_MS", default_value_t = 100)]
    pub min_timeout_ms: u64,
    /// Largest timeout Begin accepts, in ms.
    #[arg(long, env = "TCC_MAX_TIMEOUT_MS", default_value_t = 3_600_000)]
    pub max_timeout_ms: u64,
}

impl Limits {
    /// The gRPC decoding limit of `Topics`: the largest Append that can be
    /// valid (one that fills a whole topic) plus room for its framing. A
    /// larger message is refused from its length prefix, before any of it is
    /// buffered.
    pub fn max_append_message_bytes(&self) -> usize {
        let topic = usize::try_from(self.max_topic_bytes).unwrap_or(usize::MAX);
        topic.saturating_add(self.max_commands_per_append.saturating_mul(16)).saturating_add(fixed::SMALL_MESSAGE_BYTES)
    }

    /// The gRPC decoding limit of the other services, whose requests carry
    /// no commands: ids, names, a reason, and at most `max_participants`
    /// service names.
    pub fn max_small_message_bytes(&self) -> usize {
        self.max_participants.saturating_mul(fixed::MAX_SERVICE_NAME + 8).saturating_add(fixed::SMALL_MESSAGE_BYTES)
    }
}

/// A database URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Fixed limits that are not worth a flag.
pub mod fixed {
    /// Longest service name.
    pub const MAX_SERVICE_NAME: usize = 128;
    /// Longest command type name.
    pub const MAX_COMMAND_TYPE: usize = 256;
    /// Longest command key.
    pub const MAX_COMMAND_KEY: usize = 256;
    /// Longest idempotency key.
    pub const MAX_IDEMPOTENCY_KEY: usize = 128;
    /// Longest cancel reason.
    pub const MAX_REASON: usize = 1024;
    /// Longest endpoint URI.
    pub const MAX_ENDPOINT: usize = 512;
    /// Default wait of Confirm/Cancel with `wait`, in ms.
    pub const DEFAULT_WAIT_MS: u64 = 10_000;
    /// Longest wait of Confirm/Cancel, in ms.
    pub const MAX_WAIT_MS: u64 = 60_000;
    /// Largest page of ListTransactions and Read.
    pub const MAX_PAGE: usize = 1000;
    /// Default registration lease, in ms.
    pub const DEFAULT_LEASE_MS: u64 = 30_000;
    /// Shortest registration lease, in ms.
    pub const MIN_LEASE_MS: u64 = 1_000;
    /// Longest registration lease, in ms.
    pub const MAX_LEASE_MS: u64 = 600_000;
    /// Most registered instances of one service.
    pub const MAX_INSTANCES_PER_SERVICE: usize = 64;
    /// Most services with registered instances.
    pub const MAX_SERVICES: usize = 1024;
    /// Registrations one peer address may hold in open mode (no policy).
    pub const MAX_REGISTRATIONS_PER_PEER: usize = 64;
    /// Largest gRPC message the coordinator sends (a Read page, a phase-2
    /// call). What it accepts is bounded by [`super::Limits`].
    pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
    /// Room for everything but commands in a request, and the decoding limit
    /// of a participant's answer.
    pub const SMALL_MESSAGE_BYTES: usize = 64 << 10;
}

/// How phase-2 calls are made and retried.
#[derive(Clone, Debug, Args)]
pub struct DeliveryPolicy {
    /// Deadline of one commit/rollback call, in ms.
    #[arg(long, env = "TCC_CALL_TIMEOUT_MS", default_value_t = 5_000)]
    pub call_timeout_ms: u64,
    /// First retry delay, in ms; doubles per attempt up to the maximum, with
    /// jitter.
    #[arg(long, env = "TCC_RETRY_INITIAL_MS", default_value_t = 100)]
    pub retry_initial_ms: u64,
    /// Largest retry delay, in ms.
    #[arg(long, env = "TCC_RETRY_MAX_MS", default_value_t = 10_000)]
    pub retry_max_ms: u64,
    /// Phase-2 calls per participant before the transaction is marked
    /// FAILED_TO_CONFIRM / FAILED_TO_CANCEL (0 = retry forever).
    #[arg(long, env = "TCC_RETRY_MAX_ATTEMPTS", default_value_t = 200)]
    pub retry_max_attempts: u32,
}

impl DeliveryPolicy {
    /// The delay before attempt `attempt + 1`, given `attempt` calls made:
    /// capped exponential backoff with "equal jitter" (half fixed, half
    /// random), so retries of many transactions spread out.
    pub fn backoff(&self, attempt: u32, entropy: &dyn crate::clock::Entropy) -> Duration {
        let exp = self.retry_initial_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(30));
        let capped = exp.min(self.retry_max_ms).max(1);
        let half = capped / 2;
        Duration::from_millis(half + entropy.up_to(capped - half))
    }

    /// True when `attempts` calls exhaust the budget.
    pub fn exhausted(&self, attempts: u32) -> bool {
        self.retry_max_attempts != 0 && attempts >= self.retry_max_attempts
    }
}

/// An address to listen on: IP:PORT, or HOST:PORT for a name this machine
/// resolves (the first address it gives).
fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} is not IP:PORT (or HOST:PORT), e.g. 127.0.0.1:50051"));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("{text:?}: {port:?} is not a port number (0 to 65535)"));
    }
    let mut found = std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|e| format!("{text:?}: cannot resolve {host:?} ({e}); give an IP address, e.g. 127.0.0.1:{port}"))?;
    found.next().ok_or_else(|| format!("{text:?}: {host:?} resolves to no address; give an IP address"))
}

/// The known name closest to `given` (a typo of it), if one is close.
fn closest<'a>(given: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (strsim::jaro_winkler(given, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_configuration() {
        let c = Config::try_parse_from(["tcc-coordinator"]);
        let c = c.map_err(|e| e.to_string());
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn contradictory_settings_are_refused_naming_the_flag() {
        let bad = |args: &[&str]| {
            let mut all = vec!["tcc-coordinator"];
            all.extend_from_slice(args);
            Config::try_parse_from(all).map_err(|e| e.to_string()).and_then(|c| c.validate())
        };
        assert!(bad(&[]).is_ok());
        assert!(bad(&["--max-participants", "0"]).is_err_and(|e| e.contains("--max-participants")));
        assert!(
            bad(&["--min-timeout-ms", "5000", "--default-timeout-ms", "1000"]).is_err_and(|e| e.contains("timeouts"))
        );
        assert!(
            bad(&["--retry-initial-ms", "500", "--retry-max-ms", "100"]).is_err_and(|e| e.contains("--retry-max-ms"))
        );
        assert!(bad(&["--listen", "nonsense"]).is_err());
        // Host names this machine resolves are taken; others say what to give.
        assert!(bad(&["--listen", "localhost:50081"]).is_ok());
        let listen = |text: &str| parse_addr(text).map(|a| a.port());
        assert_eq!(listen("localhost:50081"), Ok(50081));
        assert!(listen("no-such-host.invalid:1").is_err_and(|e| e.contains("give an IP address")));
        assert!(listen("localhost:http").is_err_and(|e| e.contains("not a port number")));
        assert!(bad(&["--lease-ms", "10"]).is_err_and(|e| e.contains("--lease-ms")));
        assert!(bad(&["--database-url", "mysql://x"]).is_err_and(|e| e.contains("--database-url")));
        assert!(bad(&["--database-url", "postgres://tcc@127.0.0.1/db"]).is_ok());
        // Plaintext stays on loopback unless --insecure; TLS may listen anywhere.
        let open = "--allow-open-access";
        assert!(bad(&["--listen", "0.0.0.0:50051", open]).is_err_and(|e| e.contains("--insecure")));
        assert!(bad(&["--listen", "[::]:50051", open]).is_err_and(|e| e.contains("not a loopback")));
        assert!(bad(&["--listen", "0.0.0.0:50051", "--insecure", open]).is_ok());
        assert!(bad(&["--listen", "0.0.0.0:50051", "--tls-cert", "c.pem", "--tls-key", "k.pem", open]).is_ok());
        assert!(bad(&["--listen", "[::1]:50051"]).is_ok());
        // Beyond loopback, no policy is refused unless open access is asked for.
        let tls = ["--listen", "0.0.0.0:50051", "--tls-cert", "c.pem", "--tls-key", "k.pem"];
        assert!(bad(&tls).is_err_and(|e| e.contains("--policy") && e.contains("--allow-open-access")));
        assert!(bad(&[&tls[..], &["--tls-client-ca", "ca.pem"]].concat()).is_err_and(|e| e.contains("--policy")));
        assert!(bad(&[&tls[..], &["--tls-client-ca", "ca.pem", "--policy", "p.toml"]].concat()).is_ok());
        assert!(bad(&["--listen", "0.0.0.0:50051", "--insecure"]).is_err_and(|e| e.contains("--allow-open-access")));
        // The TLS flags go together; a policy needs a way to identify callers.
        assert!(bad(&["--tls-cert", "c.pem"]).is_err());
        assert!(bad(&["--tls-client-ca", "ca.pem"]).is_err());
        assert!(bad(&["--tokens", "t"]).is_err());
        assert!(bad(&["--policy", "p.toml"]).is_err_and(|e| e.contains("--tls-client-ca")));
        assert!(bad(&["--policy", "p.toml", "--tokens", "t"]).is_ok());
    }

    /// Loads `args` with `toml` as the --config file.
    fn with_file(toml: &str, args: &[&str]) -> Result<Config, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("tcc.toml");
        std::fs::write(&path, toml).map_err(|e| e.to_string())?;
        let path = path.to_string_lossy().into_owned();
        let mut all = vec!["tcc-coordinator", "--config", &path];
        all.extend_from_slice(args);
        Config::load_from(all).map_err(|e| e.to_string())
    }

    #[test]
    fn a_settings_file_is_read_under_the_flags() -> Result<(), String> {
        let toml = "max-participants = 2\nretention_secs = 60\ninsecure = true\nparticipant = [\"a=http://127.0.0.1:1\", \"b=http://127.0.0.1:2\"]\n";
        let c = with_file(toml, &[])?;
        assert_eq!((c.limits.max_participants, c.retention_secs, c.insecure), (2, 60, true));
        assert_eq!(c.participants.len(), 2);
        assert!(c.summary().starts_with("settings file "), "{}", c.summary());
        // A flag beats the file.
        assert_eq!(with_file(toml, &["--max-participants", "5"])?.limits.max_participants, 5);
        assert_eq!(with_file(toml, &["--max-participants=6"])?.limits.max_participants, 6);
        assert!(!with_file("insecure = false", &[])?.insecure);
        Ok(())
    }

    #[test]
    fn a_bad_settings_file_is_refused_naming_the_key() {
        let err = |toml: &str| with_file(toml, &[]).err().unwrap_or_default();
        let unknown = err("max-participant = 2");
        assert!(unknown.contains("unknown setting \"max-participant\"") && unknown.contains("tcc.toml"), "{unknown}");
        assert!(unknown.contains("did you mean \"max-participants\"?"), "{unknown}");
        let far = err("colour = \"blue\"");
        assert!(far.contains("unknown setting \"colour\"") && !far.contains("did you mean"), "{far}");
        let bad = err("max-participants = \"many\"");
        assert!(bad.contains("--max-participants") && bad.contains("many") && bad.contains("tcc.toml"), "{bad}");
        assert!(err("insecure = \"yes\"").contains("switch"));
        assert!(err("max-participants = { a = 1 }").contains("must be a string"));
        assert!(err("this is not toml").contains("not valid TOML"));
        assert!(err("config = \"other.toml\"").contains("unknown setting"));
        let missing = Config::load_from(["tcc-coordinator", "--config", "/nonexistent/tcc.toml"]).err();
        assert!(missing.is_some_and(|e| e.to_string().contains("cannot read the settings file")));
    }

    #[test]
    fn the_example_settings_file_names_every_setting_and_loads() -> Result<(), String> {
        let example = include_str!("../ops/tcc.toml");
        for arg in Config::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version" | "config") {
                continue;
            }
            assert!(example.contains(&format!("# {long} = ")), "ops/tcc.toml does not document {long}");
        }
        // Every setting uncommented: the file loads and validates.
        let all: String = example
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = with_file(&all, &[])?;
        c.validate()?;
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
        Ok(())
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redact_url("postgres://tcc:secret@db:5432/tcc"), "postgres://tcc:***@db:5432/tcc");
        assert_eq!(redact_url("postgres://tcc@db/tcc"), "postgres://tcc@db/tcc");
        assert_eq!(redact_url("postgres://db/tcc"), "postgres://db/tcc");
        let c = Config::try_parse_from(["tcc-coordinator", "--database-url", "postgres://u:pw@h/db"]);
        let summary = c.map(|c| c.summary()).unwrap_or_default();
        assert!(summary.contains("postgres://u:***@h/db") && !summary.contains("pw"), "{summary}");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let p = DeliveryPolicy { call_timeout_ms: 1, retry_initial_ms: 100, retry_max_ms: 1000, retry_max_attempts: 5 };
        let e = crate::clock::OsEntropy;
        for _ in 0..100 {
            let d1 = p.backoff(1, &e).as_millis();
            assert!((50..=100).contains(&d1), "{d1}");
            let d3 = p.backoff(3, &e).as_millis();
            assert!((200..=400).contains(&d3), "{d3}");
            let d20 = p.backoff(20, &e).as_millis();
            assert!((500..=1000).contains(&d20), "{d20}");
        }
        assert!(!p.exhausted(4));
        assert!(p.exhausted(5));
    }
}
