//! Daemon configuration: TOML with portals, targets by IQN, LUNs, CHAP and initiator ACLs.
//!
//! Parsing rejects unknown keys; [`Config::resolve`] checks the values, naming the
//! offending key in every error (e.g. `target[1].lun[0].size: ...`), and parses the ones
//! written as text (sizes, addresses, modes) into a [`ResolvedConfig`]: the daemon takes
//! its values from there and never reads those strings again. [`Config`] itself stays
//! the file as written, which is what `admin config --effective` shows.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::media::{CacheMode, CacheWrites};
use crate::routing::interfaces::{InterfaceSpec, InterfacesConfig};

/// The configuration a bare `ftss-target` starts with.
pub const DEFAULT_CONFIG: &str = r#"# ftss-target embedded default configuration
[server]
portals = ["127.0.0.1:3260"]
data_dir = "./ftss-data"

[[target]]
iqn = "iqn.2026-11.org.ftss:target0"
alias = "ftss target0"

[[target.lun]]
lun = 0
mirrors = ["lun0-a.mirror", "lun0-b.mirror"]
size = "1GiB"
block_size = 512

# Network packets between the nodes logged in (vendor commands), stored mirrored.
[packets]
mirrors = ["packets-a.mirror", "packets-b.mirror"]
size = "256MiB"
"#;

/// A configuration error that names the key it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type (the message names it).
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A value that parses but is not acceptable.
    #[error("{key}: {msg}")]
    Invalid {
        /// Dotted key path, e.g. `target[0].lun[1].block_size`.
        key: String,
        /// What is wrong.
        msg: String,
    },
}

fn invalid(key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        msg: msg.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Server-wide settings.
    pub server: ServerConfig,
    /// Durable media for LUNs with mirrors.
    #[serde(default)]
    pub media: MediaConfig,
    /// Targets, by IQN.
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
    /// The packet queue and routing agent (vendor commands); absent = vendor commands
    /// are refused as unsupported opcodes.
    #[serde(default)]
    pub packets: Option<PacketsConfig>,
    /// Nodes known before they log in: addresses by initiator name.
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeConfig>,
}

/// Largest packet payload, as a quota floor.
fn vendor_payload_max() -> u64 {
    ftss_proto::vendor::PAYLOAD_MAX as u64
}

/// `[packets]`: where packets are stored and how long they are kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PacketsConfig {
    /// Mirror files of the packet queue (two or more; relative to `server.data_dir`).
    #[serde(default = "default_packet_mirrors")]
    pub mirrors: Vec<PathBuf>,
    /// Size of the packet queue with a unit: the most that can be stored at once.
    #[serde(default = "default_packet_size")]
    pub size: String,
    /// Seconds an acknowledged packet stays readable by REPLAY (while space allows).
    #[serde(default)]
    pub retain_s: u64,
    /// Seconds a stored packet may wait for a destination that went down before its
    /// sender gets a delivery-failure notice.
    #[serde(default = "default_delivery_timeout")]
    pub delivery_timeout_s: u64,
    /// Packet ids remembered per daemon for duplicate suppression (most recent first).
    #[serde(default = "default_dedup_window")]
    pub dedup_window: usize,
    /// Seconds a packet id is still recognized as a retry after its packet was
    /// acknowledged and released: a sender that lost the SEND's answer, failed over to
    /// another path and sends again within this time is answered with the original's
    /// outcome instead of delivering the packet twice.
    #[serde(default = "default_dedup_hold")]
    pub dedup_hold_s: u64,
    /// Unacknowledged payload bytes one destination node may hold, with a unit; default
    /// a quarter of `size`. A node at its quota gets no more packets (senders see
    /// DESTINATION QUEUE FULL) while every other node's traffic goes on.
    #[serde(default)]
    pub node_quota_bytes: Option<String>,
    /// Unacknowledged packets one destination node may hold; default: as many
    /// one-block (512-byte) records as a quarter of `size` holds.
    #[serde(default)]
    pub node_quota_records: Option<u64>,
    /// The external network port.
    #[serde(default)]
    pub external: Option<ExternalConfig>,
}

/// `[packets.external]`: the network outside the nodes, through TUN interfaces of the
/// target host (`[[packets.external.interface]]`) or a UDP tunnel (`bind`, `peers`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalConfig {
    /// UDP tunnel: local address the port receives on (with `peers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    /// UDP tunnel: gateways packets go out to, in order of preference: the next is the
    /// alternate path when one fails.
    #[serde(default)]
    pub peers: Vec<String>,
    /// TUN interfaces of the target host; when there are any, packets for the outside
    /// leave through them (the UDP tunnel, if also configured, then only takes packets
    /// in).
    #[serde(default, rename = "interface")]
    pub interfaces: Vec<InterfaceConfig>,
    /// Oldest a packet for the outside may get while no interface is healthy, in ms.
    #[serde(default = "default_backlog_age_ms_max")]
    pub backlog_age_ms_max: u64,
    /// Most bytes of packets waiting for a healthy interface, with a unit.
    #[serde(default = "default_backlog_bytes_max")]
    pub backlog_bytes_max: String,
    /// A monitoring TUN interface that gets a copy of every packet delivered between
    /// nodes (off when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<String>,
}

/// `[[packets.external.interface]]`: one TUN interface of the target host.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Interface name (1 to 15 bytes), created by the daemon.
    pub name: String,
    /// The host's IPv4 address on it with its prefix, e.g. `10.200.1.1/30`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The daemon's own end of the link (source of probes and ICMP answers); default:
    /// the next host address of `address`'s subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    /// MTU.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Lower numbers are preferred: the healthy interface with the lowest carries the
    /// traffic out.
    #[serde(default)]
    pub priority: u32,
    /// An IPv4 address that answers ICMP echo through this interface (the health probe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// Interval between probes and link-state reads, in ms.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// Unanswered probe intervals before the interface counts as failed.
    #[serde(default = "default_probe_misses")]
    pub probe_misses: u32,
    /// How long a recovered interface must stay healthy before it carries traffic again,
    /// in ms.
    #[serde(default = "default_hold_down_ms")]
    pub hold_down_ms: u64,
}

fn default_backlog_age_ms_max() -> u64 {
    5_000
}

fn default_backlog_bytes_max() -> String {
    "4MiB".into()
}

fn default_mtu() -> u32 {
    1500
}

fn default_probe_interval_ms() -> u64 {
    200
}

fn default_probe_misses() -> u32 {
    3
}

fn default_hold_down_ms() -> u64 {
    5_000
}

fn valid_ifname(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains(['/', ' ', '\0'])
        || name == "."
        || name == ".."
    {
        return Err(invalid(
            key,
            "an interface name has 1 to 15 bytes, no '/' or space",
        ));
    }
    Ok(())
}

fn ipv4(key: &str, s: &str) -> Result<std::net::Ipv4Addr, ConfigError> {
    s.parse::<std::net::Ipv4Addr>()
        .map_err(|e| invalid(key, format!("{s:?}: {e} (IPv4 only)")))
}

impl ExternalConfig {
    /// The external interfaces' settings, checked; `None` without interfaces or echo.
    pub fn interfaces_config(&self) -> Result<Option<InterfacesConfig>, ConfigError> {
        if self.interfaces.is_empty() && self.echo.is_none() {
            return Ok(None);
        }
        let mut names = HashSet::new();
        let mut interfaces = Vec::new();
        for (i, x) in self.interfaces.iter().enumerate() {
            let key = |k: &str| format!("packets.external.interface[{i}].{k}");
            valid_ifname(&key("name"), &x.name)?;
            if !names.insert(x.name.clone()) {
                return Err(invalid(key("name"), "used twice"));
            }
            let address = match &x.address {
                Some(a) => {
                    let (ip, len) = a.split_once('/').ok_or_else(|| {
                        invalid(key("address"), "needs a prefix: \"10.200.1.1/30\"")
                    })?;
                    let len: u8 = len
                        .parse()
                        .ok()
                        .filter(|l| (1..=32).contains(l))
                        .ok_or_else(|| invalid(key("address"), "prefix length 1 to 32"))?;
                    Some((ipv4(&key("address"), ip)?, len))
                }
                None => None,
            };
            let local = match (&x.local, address) {
                (Some(l), _) => Some(ipv4(&key("local"), l)?),
                (None, Some((a, len))) => crate::routing::netif::peer_in_subnet(a, len),
                (None, None) => None,
            };
            let probe = x
                .probe
                .as_deref()
                .map(|p| ipv4(&key("probe"), p))
                .transpose()?;
            if probe.is_some() && local.is_none() {
                return Err(invalid(
                    key("probe"),
                    "needs `local` (or an `address` whose subnet has room for it)",
                ));
            }
            if !(68..=65_535).contains(&x.mtu) {
                return Err(invalid(key("mtu"), "68 to 65535"));
            }
            if x.probe_interval_ms < 10 {
                return Err(invalid(key("probe_interval_ms"), "at least 10"));
            }
            if x.probe_misses == 0 {
                return Err(invalid(key("probe_misses"), "at least 1"));
            }
            if x.probe_interval_ms > 60_000 {
                return Err(invalid(key("probe_interval_ms"), "at most 60000"));
            }
            if x.hold_down_ms > 3_600_000 {
                return Err(invalid(key("hold_down_ms"), "at most 3600000 (an hour)"));
            }
            interfaces.push(InterfaceSpec {
                name: x.name.clone(),
                address,
                local,
                mtu: x.mtu,
                priority: x.priority,
                probe,
                probe_interval: Duration::from_millis(x.probe_interval_ms),
                probe_misses: x.probe_misses,
                hold_down: Duration::from_millis(x.hold_down_ms),
            });
        }
        if let Some(e) = &self.echo {
            valid_ifname("packets.external.echo", e)?;
            if names.contains(e) {
                return Err(invalid(
                    "packets.external.echo",
                    "is also an external interface",
                ));
            }
        }
        if self.backlog_age_ms_max > 3_600_000 {
            return Err(invalid(
                "packets.external.backlog_age_ms_max",
                "at most 3600000 (an hour)",
            ));
        }
        let backlog_bytes_max = parse_size(&self.backlog_bytes_max)
            .map_err(|e| invalid("packets.external.backlog_bytes_max", e))?;
        Ok(Some(InterfacesConfig {
            interfaces,
            backlog_age_max: Duration::from_millis(self.backlog_age_ms_max),
            backlog_bytes_max: usize::try_from(backlog_bytes_max).unwrap_or(usize::MAX),
            echo: self.echo.clone(),
        }))
    }
}

/// `[[node]]`: a node's addresses, given to every session of its initiator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// iSCSI initiator name of the node's sessions.
    pub initiator: String,
    /// IPv4 or IPv6 addresses.
    pub addresses: Vec<String>,
    /// `[node.chap]`: CHAP credentials of this initiator. When given, every login with
    /// this InitiatorName (normal or discovery, to any target) must pass CHAP with them,
    /// so the name is authenticated rather than merely asserted; they take the place of
    /// the target's or the discovery CHAP for this initiator.
    #[serde(default)]
    pub chap: Option<ChapConfig>,
}

fn default_packet_mirrors() -> Vec<PathBuf> {
    vec![
        PathBuf::from("packets-a.mirror"),
        PathBuf::from("packets-b.mirror"),
    ]
}
fn default_packet_size() -> String {
    "256MiB".into()
}
fn default_delivery_timeout() -> u64 {
    30
}
fn default_dedup_window() -> usize {
    1 << 20
}
fn default_dedup_hold() -> u64 {
    60
}

/// `[media]`: the write cache in front of every mirrored LUN.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MediaConfig {
    /// Write-cache file; relative to `server.data_dir`.
    #[serde(default = "default_cache_path")]
    pub cache_path: PathBuf,
    /// Write-cache size with a unit.
    #[serde(default = "default_cache_size")]
    pub cache_size: String,
    /// "nonvolatile": GOOD only once a write is committed to the cache (survives power
    /// loss); "volatile": GOOD on reaching the cache, durable after SYNCHRONIZE CACHE/FUA.
    #[serde(default = "default_cache_mode")]
    pub cache: String,
    /// How records enter the mapped cache file and how a commit makes them durable:
    /// "direct" (stores into a private map, a commit is one `O_DIRECT` + `RWF_DSYNC`
    /// write of their pages; the default), "write" (`pwrite` into the shared map, a
    /// commit is `msync`) or "map" (CPU stores through the shared map, for a DAX file on
    /// persistent memory; a commit is `msync`).
    #[serde(default = "default_cache_writes")]
    pub cache_writes: String,
    /// Bytes per second a mirror rebuild copies unless the admin command says otherwise,
    /// so a rebuild does not starve the LUN's own I/O.
    #[serde(default = "default_rebuild_rate")]
    pub rebuild_rate: String,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            cache_path: default_cache_path(),
            cache_size: default_cache_size(),
            cache: default_cache_mode(),
            cache_writes: default_cache_writes(),
            rebuild_rate: default_rebuild_rate(),
        }
    }
}

fn default_cache_path() -> PathBuf {
    PathBuf::from("write-cache")
}
fn default_cache_size() -> String {
    "256MiB".into()
}
fn default_cache_mode() -> String {
    "nonvolatile".into()
}
fn default_cache_writes() -> String {
    "direct".into()
}
fn default_rebuild_rate() -> String {
    "64MiB".into()
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from("ftss-admin.sock")
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen addresses; every one is advertised in SendTargets answers.
    pub portals: Vec<String>,
    /// Directory for LUN files and state; relative LUN paths resolve against it.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// CHAP for discovery sessions.
    #[serde(default)]
    pub discovery_chap: Option<ChapConfig>,
    /// Most sessions at once, over all targets.
    #[serde(default = "default_sessions_max")]
    pub sessions_max: u32,
    /// Commands one session may have queued (the CmdSN window).
    #[serde(default = "default_cmd_window")]
    pub cmd_window: u32,
    /// Seconds of silence on a connection before the target sends a NOP-In ping.
    #[serde(default = "default_nop_interval")]
    pub nop_interval_s: u32,
    /// Seconds to wait for the answer to a NOP-In ping before dropping the connection.
    #[serde(default = "default_nop_timeout")]
    pub nop_timeout_s: u32,
    /// Unix socket of the admin interface (`ftss-target admin`); relative to `data_dir`.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Seconds a graceful shutdown (SIGTERM, SIGINT) waits for the commands in flight,
    /// and again for the write cache to destage, before the daemon exits anyway (what
    /// was acknowledged is in the nonvolatile cache either way).
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_s: u32,
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9470`;
    /// unset: no endpoint.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Threads that run the connections (the async runtime's workers); unset: half the
    /// cores, at least one. See [`ServerConfig::workers`].
    #[serde(default)]
    pub worker_threads: Option<u32>,
}

impl ServerConfig {
    /// The runtime's worker threads: `worker_threads`, or half the cores (at least one).
    ///
    /// Why not one per core: a worker only moves PDUs and runs commands that cannot
    /// block; commits, destage and mirror I/O have threads of their own, and initiators
    /// often share the host. A second worker on two cores mostly adds wake-ups of a
    /// parked thread and context switches: one was faster on 6 of the 7 tests of
    /// `ci/bench-ab.sh` (4 KiB writes +5%, writes with a flush each +17%, 128 KiB reads
    /// +19%; 32 packets in flight -8%, within that test's spread).
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            Some(n) => n as usize,
            None => default_workers(std::thread::available_parallelism().map_or(1, |n| n.get())),
        }
    }

    /// The admin socket's path: `admin_socket`, relative to `data_dir` unless absolute.
    pub fn admin_socket_path(&self) -> PathBuf {
        if self.admin_socket.is_absolute() {
            self.admin_socket.clone()
        } else {
            self.data_dir.join(&self.admin_socket)
        }
    }
}

/// Half of `cores`, at least one (see [`ServerConfig::workers`]).
fn default_workers(cores: usize) -> usize {
    (cores / 2).max(1)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./ftss-data")
}
fn default_sessions_max() -> u32 {
    64
}
fn default_cmd_window() -> u32 {
    64
}
fn default_nop_interval() -> u32 {
    10
}
fn default_nop_timeout() -> u32 {
    30
}
fn default_shutdown_timeout() -> u32 {
    30
}

/// CHAP credentials: the initiator's name and secret, and for mutual CHAP the target's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChapConfig {
    /// Name the initiator must present (CHAP_N).
    pub username: String,
    /// Secret the initiator proves knowledge of.
    pub secret: String,
    /// Name the target presents in mutual CHAP.
    #[serde(default)]
    pub mutual_username: Option<String>,
    /// Secret the target proves knowledge of in mutual CHAP.
    #[serde(default)]
    pub mutual_secret: Option<String>,
}

/// `[[target]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// iSCSI qualified name.
    pub iqn: String,
    /// TargetAlias.
    #[serde(default)]
    pub alias: Option<String>,
    /// Initiator names allowed to log in; absent means any.
    #[serde(default)]
    pub initiators: Option<Vec<String>>,
    /// CHAP required for this target.
    #[serde(default)]
    pub chap: Option<ChapConfig>,
    /// Initiator names allowed to send TARGET WARM RESET and TARGET COLD RESET (a cold
    /// reset ends every session of the target); empty, the default: nobody. Others get
    /// the TMF response "Function authorization failed".
    #[serde(default)]
    pub reset_initiators: Vec<String>,
    /// Logical units.
    #[serde(default, rename = "lun")]
    pub luns: Vec<LunConfig>,
}

impl TargetConfig {
    /// Whether `initiator` may reset the whole target (TARGET WARM/COLD RESET).
    pub fn may_reset(&self, initiator: &str) -> bool {
        self.reset_initiators
            .iter()
            .any(|n| n.eq_ignore_ascii_case(initiator))
    }
}

/// `[[target.lun]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LunConfig {
    /// LUN number (0..16383).
    pub lun: u16,
    /// Plain backing file; relative to `server.data_dir`. Created sparse when missing.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Mirror files (two or more, ideally on different file systems) behind the write
    /// cache; relative to `server.data_dir`. Exclusive with `path`.
    #[serde(default)]
    pub mirrors: Vec<PathBuf>,
    /// Size with a unit: "1GiB", "256MiB", "4096" (bytes).
    pub size: String,
    /// Logical block size: 512 or 4096.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Write-protected LUN.
    #[serde(default)]
    pub read_only: bool,
    /// Removable medium (START STOP UNIT may eject it).
    #[serde(default)]
    pub removable: bool,
    /// LUN masking: the initiator names that see this LUN (in REPORT LUNS, and for every
    /// command); absent: every initiator the target admits. To the others it does not
    /// exist. Vendor (packet) commands only name a LUN to reach the target, and are not
    /// affected.
    #[serde(default)]
    pub initiators: Option<Vec<String>>,
    /// Physical block size reported to initiators (READ CAPACITY (16)), a power-of-two
    /// multiple of `block_size` up to 32768 blocks; absent: `block_size`. 4096 on a
    /// 512-byte LUN says what the media does (its files are read, written back and
    /// punched in 4 KiB pages), so initiators align partitions and I/O to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_block_size: Option<u32>,
}

fn default_block_size() -> u32 {
    512
}

/// Parses "1GiB", "256 MiB", "4k", "1048576" into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as \"1GiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use KiB, MiB, GiB, TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} overflows"))
}

impl Config {
    /// The embedded default configuration.
    pub fn default_config() -> Self {
        Self::parse(DEFAULT_CONFIG).expect("the embedded default configuration is valid")
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Checks every value, naming the key of the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.resolve().map(|_| ())
    }

    /// Checks every value, naming the key of the first bad one, and parses the ones
    /// written as text (sizes, addresses, modes) into what the daemon runs on. The one
    /// place those strings are read: whoever starts or reloads the daemon takes the
    /// values from here, so a value cannot pass the check and then be read otherwise.
    pub fn resolve(&self) -> Result<ResolvedConfig, ConfigError> {
        let (portals, metrics) = self.resolve_server()?;
        let media = self.media.resolve()?;
        let packets = self
            .packets
            .as_ref()
            .map(PacketsConfig::resolve)
            .transpose()?;
        let node_addresses = self.resolve_nodes()?;
        let lun_sizes = self.resolve_targets()?;
        Ok(ResolvedConfig {
            file: self.clone(),
            portals,
            metrics,
            media,
            lun_sizes,
            packets,
            node_addresses,
        })
    }

    /// `[server]`: the portals and the metrics endpoint, parsed.
    fn resolve_server(&self) -> Result<(Vec<SocketAddr>, Option<SocketAddr>), ConfigError> {
        let s = &self.server;
        if s.portals.is_empty() {
            return Err(invalid("server.portals", "at least one portal is required"));
        }
        let portals = s
            .portals
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.parse::<SocketAddr>().map_err(|e| {
                    invalid(
                        format!("server.portals[{i}]"),
                        format!("{p:?}: {e} (want host:port)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !(1..=4096).contains(&s.cmd_window) {
            return Err(invalid("server.cmd_window", "must be 1..=4096"));
        }
        if s.sessions_max == 0 {
            return Err(invalid("server.sessions_max", "must be at least 1"));
        }
        if s.worker_threads.is_some_and(|n| !(1..=1024).contains(&n)) {
            return Err(invalid("server.worker_threads", "must be 1..=1024"));
        }
        if s.nop_interval_s == 0 || s.nop_timeout_s == 0 {
            return Err(invalid(
                "server.nop_interval_s",
                "NOP interval and timeout must be > 0",
            ));
        }
        if let Some(c) = &s.discovery_chap {
            c.validate("server.discovery_chap")?;
        }
        let metrics = s
            .metrics
            .as_deref()
            .map(|m| {
                m.parse::<SocketAddr>()
                    .map_err(|e| invalid("server.metrics", format!("{m:?}: {e} (want host:port)")))
            })
            .transpose()?;
        Ok((portals, metrics))
    }

    /// `[[node]]`: each node's addresses, parsed, in the file's order.
    fn resolve_nodes(&self) -> Result<Vec<Vec<IpAddr>>, ConfigError> {
        let mut seen = HashSet::new();
        let mut all = Vec::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            validate_name(&n.initiator).map_err(|e| invalid(format!("node[{i}].initiator"), e))?;
            if let Some(c) = &n.chap {
                c.validate(&format!("node[{i}].chap"))?;
                // Credentials are looked up by initiator name: a second entry of the
                // same name would leave it open which ones apply.
                if let Some(j) = self
                    .nodes
                    .iter()
                    .enumerate()
                    .position(|(j, m)| j != i && m.initiator.eq_ignore_ascii_case(&n.initiator))
                {
                    return Err(invalid(
                        format!("node[{i}].chap"),
                        format!("{} also has node[{j}]: an initiator with CHAP credentials must have one [[node]]", n.initiator),
                    ));
                }
            }
            if n.addresses.is_empty() {
                return Err(invalid(
                    format!("node[{i}].addresses"),
                    "needs at least one",
                ));
            }
            let mut addrs = Vec::with_capacity(n.addresses.len());
            for (j, a) in n.addresses.iter().enumerate() {
                let ip: IpAddr = a.parse().map_err(|e| {
                    invalid(format!("node[{i}].addresses[{j}]"), format!("{a:?}: {e}"))
                })?;
                if ip.is_unspecified() || !seen.insert(ip) {
                    return Err(invalid(
                        format!("node[{i}].addresses[{j}]"),
                        format!("{a} is unspecified or given to two nodes"),
                    ));
                }
                addrs.push(ip);
            }
            all.push(addrs);
        }
        Ok(all)
    }

    /// `[[target]]`: names, ACLs and LUNs checked; each LUN's size in bytes, by target
    /// and LUN in the file's order.
    fn resolve_targets(&self) -> Result<Vec<Vec<u64>>, ConfigError> {
        if self.targets.is_empty() {
            return Err(invalid("target", "at least one [[target]] is required"));
        }
        let mut iqns = HashSet::new();
        let mut sizes = Vec::with_capacity(self.targets.len());
        for (ti, t) in self.targets.iter().enumerate() {
            let key = format!("target[{ti}]");
            validate_name(&t.iqn).map_err(|m| invalid(format!("{key}.iqn"), m))?;
            if !iqns.insert(t.iqn.to_ascii_lowercase()) {
                return Err(invalid(
                    format!("{key}.iqn"),
                    format!("{} is configured twice", t.iqn),
                ));
            }
            if let Some(list) = &t.initiators {
                for (i, n) in list.iter().enumerate() {
                    validate_name(n).map_err(|m| invalid(format!("{key}.initiators[{i}]"), m))?;
                }
            }
            if let Some(c) = &t.chap {
                c.validate(&format!("{key}.chap"))?;
            }
            for (i, n) in t.reset_initiators.iter().enumerate() {
                validate_name(n).map_err(|m| invalid(format!("{key}.reset_initiators[{i}]"), m))?;
            }
            let mut luns = HashSet::new();
            let mut target_sizes = Vec::with_capacity(t.luns.len());
            for (li, l) in t.luns.iter().enumerate() {
                let lk = format!("{key}.lun[{li}]");
                if l.lun > 16383 {
                    return Err(invalid(format!("{lk}.lun"), "must be 0..=16383"));
                }
                if !luns.insert(l.lun) {
                    return Err(invalid(
                        format!("{lk}.lun"),
                        format!("LUN {} is configured twice", l.lun),
                    ));
                }
                target_sizes.push(l.resolve(&lk)?);
            }
            sizes.push(target_sizes);
        }
        Ok(sizes)
    }

    /// The per-initiator CHAP credentials of `initiator` (`[node.chap]`), if any.
    pub fn node_chap(&self, initiator: &str) -> Option<&ChapConfig> {
        self.nodes
            .iter()
            .find(|n| n.initiator.eq_ignore_ascii_case(initiator))
            .and_then(|n| n.chap.as_ref())
    }

    /// The same configuration with every CHAP secret replaced by `<hidden secret>`, for
    /// showing: the admin socket's peers may run the daemon but need not read secrets.
    /// The placeholders are long enough, and differ, so the text still validates.
    pub fn redacted(&self) -> Config {
        fn hide(c: &mut Option<ChapConfig>) {
            if let Some(c) = c {
                c.secret = "<hidden secret>".into();
                if let Some(m) = &mut c.mutual_secret {
                    *m = "<hidden mutual secret>".into();
                }
            }
        }
        let mut c = self.clone();
        hide(&mut c.server.discovery_chap);
        for t in &mut c.targets {
            hide(&mut t.chap);
        }
        for n in &mut c.nodes {
            hide(&mut n.chap);
        }
        c
    }

    /// The target named `iqn` (names compare without case).
    pub fn target(&self, iqn: &str) -> Option<&TargetConfig> {
        self.targets
            .iter()
            .find(|t| t.iqn.eq_ignore_ascii_case(iqn))
    }

    /// Whether the ACL of target `iqn` lets `initiator` see it and log in to it (a
    /// target this configuration does not name admits nobody).
    pub fn target_allows(&self, iqn: &str, initiator: &str) -> bool {
        self.target(iqn).is_some_and(|t| match &t.initiators {
            None => true,
            Some(list) => list.iter().any(|n| n.eq_ignore_ascii_case(initiator)),
        })
    }
}

impl LunConfig {
    /// Checks this LUN (`lk` is its key, `target[i].lun[j]`) and returns its size in
    /// bytes.
    fn resolve(&self, lk: &str) -> Result<u64, ConfigError> {
        let l = self;
        if l.block_size != 512 && l.block_size != 4096 {
            return Err(invalid(format!("{lk}.block_size"), "must be 512 or 4096"));
        }
        if let Some(p) = l.physical_block_size {
            let ratio = p / l.block_size;
            if p % l.block_size != 0 || !ratio.is_power_of_two() || ratio > 1 << 15 {
                return Err(invalid(
                    format!("{lk}.physical_block_size"),
                    format!(
                        "must be block_size ({}) times a power of two up to 32768",
                        l.block_size
                    ),
                ));
            }
        }
        if let Some(list) = &l.initiators {
            for (i, n) in list.iter().enumerate() {
                validate_name(n).map_err(|m| invalid(format!("{lk}.initiators[{i}]"), m))?;
            }
        }
        let size = parse_size(&l.size).map_err(|m| invalid(format!("{lk}.size"), m))?;
        if size < u64::from(l.block_size) * 16 {
            return Err(invalid(
                format!("{lk}.size"),
                "must hold at least 16 blocks",
            ));
        }
        if size % u64::from(l.block_size) != 0 {
            return Err(invalid(
                format!("{lk}.size"),
                format!(
                    "{size} bytes is not a multiple of block_size {}",
                    l.block_size
                ),
            ));
        }
        match (&l.path, l.mirrors.len()) {
            (Some(_), n) if n > 0 => {
                return Err(invalid(
                    format!("{lk}.mirrors"),
                    "give either path or mirrors, not both",
                ))
            }
            (Some(p), _) if p.as_os_str().is_empty() => {
                return Err(invalid(format!("{lk}.path"), "must not be empty"))
            }
            (None, 0) => {
                return Err(invalid(
                    format!("{lk}.path"),
                    "a LUN needs a path or mirrors",
                ))
            }
            (None, 1) => {
                return Err(invalid(
                    format!("{lk}.mirrors"),
                    "a mirror set needs at least two files",
                ))
            }
            _ => {}
        }
        let distinct: HashSet<&PathBuf> = l.mirrors.iter().collect();
        if distinct.len() != l.mirrors.len() {
            return Err(invalid(
                format!("{lk}.mirrors"),
                "the same file is listed twice",
            ));
        }
        Ok(size)
    }
}

impl MediaConfig {
    /// Checks `[media]` and parses its sizes and modes.
    fn resolve(&self) -> Result<MediaSettings, ConfigError> {
        let m = self;
        let cache_bytes = parse_size(&m.cache_size).map_err(|e| invalid("media.cache_size", e))?;
        if cache_bytes < (2 << 20) {
            return Err(invalid("media.cache_size", "must be at least 2MiB"));
        }
        let rebuild_bytes_per_s =
            parse_size(&m.rebuild_rate).map_err(|e| invalid("media.rebuild_rate", e))?;
        let mode = match m.cache.as_str() {
            "nonvolatile" => CacheMode::Nonvolatile,
            "volatile" => CacheMode::Volatile,
            other => {
                return Err(invalid(
                    "media.cache",
                    format!("{other:?}: want \"nonvolatile\" or \"volatile\""),
                ))
            }
        };
        let writes = match m.cache_writes.as_str() {
            "direct" => CacheWrites::Direct,
            "write" => CacheWrites::Write,
            "map" => CacheWrites::Map,
            other => {
                return Err(invalid(
                    "media.cache_writes",
                    format!("{other:?}: want \"direct\", \"write\" or \"map\""),
                ))
            }
        };
        Ok(MediaSettings {
            cache_bytes,
            rebuild_bytes_per_s,
            mode,
            writes,
        })
    }
}

impl PacketsConfig {
    /// Checks `[packets]` and parses its sizes and external addresses.
    fn resolve(&self) -> Result<PacketSettings, ConfigError> {
        let p = self;
        if p.mirrors.len() < 2 {
            return Err(invalid("packets.mirrors", "needs at least two files"));
        }
        let size_bytes = parse_size(&p.size).map_err(|e| invalid("packets.size", e))?;
        if size_bytes < (1 << 20) {
            return Err(invalid("packets.size", "must be at least 1MiB"));
        }
        if p.dedup_window == 0 {
            return Err(invalid("packets.dedup_window", "must be at least 1"));
        }
        let node_quota_bytes = match &p.node_quota_bytes {
            Some(q) => {
                let q = parse_size(q).map_err(|e| invalid("packets.node_quota_bytes", e))?;
                if q < vendor_payload_max() || q > size_bytes {
                    return Err(invalid(
                        "packets.node_quota_bytes",
                        "must hold one largest packet (64KiB) and fit in packets.size",
                    ));
                }
                Some(q)
            }
            None => None,
        };
        if p.node_quota_records == Some(0) {
            return Err(invalid("packets.node_quota_records", "must be at least 1"));
        }
        let (udp, interfaces) = match &p.external {
            Some(x) => x.resolve()?,
            None => (None, None),
        };
        Ok(PacketSettings {
            size_bytes,
            node_quota_bytes,
            udp,
            interfaces,
        })
    }
}

/// The UDP tunnel of the external port: the local address and the gateways, in order
/// of preference.
type UdpTunnel = (SocketAddr, Vec<SocketAddr>);

impl ExternalConfig {
    /// Checks `[packets.external]`: the UDP tunnel's addresses, parsed, and the
    /// interfaces' settings.
    fn resolve(&self) -> Result<(Option<UdpTunnel>, Option<InterfacesConfig>), ConfigError> {
        let x = self;
        let bind = match &x.bind {
            Some(b) => {
                let bind = b
                    .parse::<SocketAddr>()
                    .map_err(|e| invalid("packets.external.bind", e.to_string()))?;
                if x.peers.is_empty() {
                    return Err(invalid("packets.external.peers", "needs at least one"));
                }
                Some(bind)
            }
            None if !x.peers.is_empty() => {
                return Err(invalid("packets.external.bind", "needed with peers"));
            }
            None if x.interfaces.is_empty() && x.echo.is_none() => {
                return Err(invalid(
                    "packets.external",
                    "needs bind and peers, an interface, or echo",
                ));
            }
            None => None,
        };
        let interfaces = x.interfaces_config()?;
        let peers = x
            .peers
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.parse::<SocketAddr>()
                    .map_err(|e| invalid(format!("packets.external.peers[{i}]"), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((bind.map(|b| (b, peers)), interfaces))
    }
}

/// A configuration with its text values parsed: what [`Config::resolve`] returns and
/// what the daemon starts and reloads from.
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    /// The file as read (what `admin config --effective` shows).
    pub(crate) file: Config,
    /// `server.portals`.
    pub(crate) portals: Vec<SocketAddr>,
    /// `server.metrics`; `None`: no endpoint.
    pub(crate) metrics: Option<SocketAddr>,
    /// `[media]`.
    pub(crate) media: MediaSettings,
    /// Each LUN's size in bytes, by target and LUN in the file's order.
    pub(crate) lun_sizes: Vec<Vec<u64>>,
    /// `[packets]`.
    pub(crate) packets: Option<PacketSettings>,
    /// Each `[[node]]`'s addresses, in the file's order.
    pub(crate) node_addresses: Vec<Vec<IpAddr>>,
}

impl ResolvedConfig {
    /// The configuration as written.
    pub fn file(&self) -> &Config {
        &self.file
    }
}

/// `[media]`, parsed.
#[derive(Debug, Clone)]
pub(crate) struct MediaSettings {
    /// `media.cache_size`.
    pub(crate) cache_bytes: u64,
    /// `media.rebuild_rate`.
    pub(crate) rebuild_bytes_per_s: u64,
    /// `media.cache`.
    pub(crate) mode: CacheMode,
    /// `media.cache_writes`.
    pub(crate) writes: CacheWrites,
}

/// `[packets]`, parsed.
#[derive(Debug, Clone)]
pub(crate) struct PacketSettings {
    /// `packets.size`.
    pub(crate) size_bytes: u64,
    /// `packets.node_quota_bytes`.
    pub(crate) node_quota_bytes: Option<u64>,
    /// `packets.external.bind` and `peers`.
    pub(crate) udp: Option<UdpTunnel>,
    /// `[[packets.external.interface]]` and `packets.external.echo`.
    pub(crate) interfaces: Option<InterfacesConfig>,
}

impl ChapConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.username.is_empty() {
            return Err(invalid(format!("{key}.username"), "must not be empty"));
        }
        // RFC 7143 section 12.1.3 asks for secrets of at least 96 bits (12 bytes).
        if self.secret.len() < 12 {
            return Err(invalid(
                format!("{key}.secret"),
                "must be at least 12 characters (RFC 7143 12.1.3)",
            ));
        }
        match (&self.mutual_username, &self.mutual_secret) {
            (None, None) => Ok(()),
            (Some(_), None) => Err(invalid(
                format!("{key}.mutual_secret"),
                "required with mutual_username",
            )),
            (None, Some(_)) => Err(invalid(
                format!("{key}.mutual_username"),
                "required with mutual_secret",
            )),
            (Some(u), Some(s)) => {
                if u.is_empty() {
                    return Err(invalid(
                        format!("{key}.mutual_username"),
                        "must not be empty",
                    ));
                }
                if s.len() < 12 {
                    return Err(invalid(
                        format!("{key}.mutual_secret"),
                        "must be at least 12 characters",
                    ));
                }
                if s == &self.secret {
                    // RFC 7143 12.1.3: the secrets for the two directions must differ.
                    return Err(invalid(
                        format!("{key}.mutual_secret"),
                        "must differ from secret",
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Checks an iSCSI name (iqn., eui. or naa. format; RFC 7143 section 4.2.7).
fn validate_name(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 223 {
        return Err(format!("{n:?}: an iSCSI name is 1..=223 bytes"));
    }
    let lower = n.to_ascii_lowercase();
    if !(lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa.")) {
        return Err(format!(
            "{n:?}: an iSCSI name starts with iqn., eui. or naa."
        ));
    }
    if let Some(c) = n
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '.' | '-' | ':')))
    {
        return Err(format!(
            "{n:?}: character {c:?} is not allowed in an iSCSI name"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_config_is_the_embedded_default_with_its_data_under_var_lib() {
        let mut packaged =
            Config::parse(include_str!("../../contrib/ftss.toml")).expect("contrib/ftss.toml");
        assert_eq!(packaged.server.data_dir, PathBuf::from("/var/lib/ftss"));
        let default = Config::default_config();
        packaged.server.data_dir = default.server.data_dir.clone();
        assert_eq!(format!("{packaged:?}"), format!("{default:?}"));
    }

    /// A minimal configuration with `line` added to its `[server]` section (or a section
    /// of its own, when `line` starts one).
    fn with_server_line(line: &str) -> String {
        format!(
            "[server]\nportals=[\"127.0.0.1:3260\"]\n{line}\n[[target]]\niqn=\"iqn.2026-11.x:t\"\n"
        )
    }

    fn err(text: &str) -> String {
        Config::parse(text)
            .expect_err("config must be refused")
            .to_string()
    }

    #[test]
    fn default_is_valid() {
        let c = Config::default_config();
        assert_eq!(c.resolve().expect("valid").portals.len(), 1);
        assert_eq!(c.targets[0].luns[0].size, "1GiB");
        assert_eq!(c.targets[0].luns[0].mirrors.len(), 2);
        assert_eq!(c.media.cache, "nonvolatile");
    }

    #[test]
    fn cache_writes_defaults_to_direct_and_each_value_picks_its_path() {
        let with = |media: &str| {
            Config::parse(&with_server_line(media))
                .expect("valid")
                .resolve()
                .expect("valid")
                .media
                .writes
        };
        assert_eq!(with(""), CacheWrites::Direct);
        for (value, want) in [
            ("direct", CacheWrites::Direct),
            ("write", CacheWrites::Write),
            ("map", CacheWrites::Map),
        ] {
            assert_eq!(with(&format!("[media]\ncache_writes=\"{value}\"")), want);
        }
    }

    #[test]
    fn worker_threads_default_to_half_the_cores_and_a_bad_count_names_its_key() {
        for (cores, want) in [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8)] {
            assert_eq!(default_workers(cores), want, "{cores} cores");
        }
        let auto = Config::parse(&with_server_line("")).expect("valid");
        assert_eq!(auto.server.worker_threads, None);
        assert!(auto.server.workers() >= 1);
        let set = Config::parse(&with_server_line("worker_threads = 3")).expect("valid");
        assert_eq!(set.server.workers(), 3);
        for bad in ["worker_threads = 0", "worker_threads = 1025"] {
            let e = err(&with_server_line(bad));
            assert!(e.contains("server.worker_threads"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("256 MiB"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
    }

    #[test]
    fn metrics_endpoint_is_off_unless_set_and_a_bad_address_names_its_key() {
        let with = with_server_line;
        let off = Config::parse(&with("")).expect("valid");
        assert_eq!(off.resolve().expect("valid").metrics, None);
        let on = Config::parse(&with("metrics=\"127.0.0.1:9470\"")).expect("valid");
        assert_eq!(
            on.resolve().expect("valid").metrics,
            Some(SocketAddr::from(([127, 0, 0, 1], 9470)))
        );
        for bad in ["localhost", "127.0.0.1", ":9470", "127.0.0.1:99999"] {
            let e = err(&with(&format!("metrics=\"{bad}\"")));
            assert!(e.starts_with("server.metrics: "), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let base = "[server]\nportals=[\"127.0.0.1:3260\"]\n[[target]]\niqn=\"iqn.2026-11.x:t\"\n";
        assert!(err(&format!(
            "{base}[[target.lun]]\nlun=0\nmirrors=[\"a\"]\nsize=\"1MiB\"\n"
        ))
        .contains("target[0].lun[0].mirrors"));
        assert!(
            err(&format!("{base}[[target.lun]]\nlun=0\nsize=\"1MiB\"\n"))
                .contains("target[0].lun[0].path")
        );
        assert!(err(&format!("[media]\ncache=\"sometimes\"\n{base}")).contains("media.cache"));
        assert!(
            err(&format!("[media]\ncache_writes=\"dma\"\n{base}")).contains("media.cache_writes")
        );
        assert!(err("[server]\nportals=[\"nope\"]\n").contains("server.portals[0]"));
        assert!(err(&format!(
            "{base}[[target.lun]]\nlun=0\npath=\"a\"\nsize=\"1GiB\"\nblock_size=1000\n"
        ))
        .contains("target[0].lun[0].block_size"));
        for bad in [0, 1000, 1536, 512 << 16] {
            assert!(err(&format!(
                "{base}[[target.lun]]\nlun=0\npath=\"a\"\nsize=\"1GiB\"\nphysical_block_size={bad}\n"
            ))
            .contains("target[0].lun[0].physical_block_size"));
        }
        Config::parse(&format!(
            "{base}[[target.lun]]\nlun=0\npath=\"a\"\nsize=\"1GiB\"\nphysical_block_size=4096\n"
        ))
        .expect("4096 over 512-byte blocks");
        assert!(err(&format!(
            "{base}[[target.lun]]\nlun=0\npath=\"a\"\nsize=\"1 furlong\"\n"
        ))
        .contains("target[0].lun[0].size"));
        assert!(err(&format!(
            "{base}[target.chap]\nusername=\"u\"\nsecret=\"short\"\n"
        ))
        .contains("target[0].chap.secret"));
        assert!(err(&format!("{base}colour=\"blue\"\n")).contains("colour"));
        assert!(
            err("[server]\nportals=[\"127.0.0.1:1\"]\n[[target]]\niqn=\"bogus name\"\n")
                .contains("target[0].iqn")
        );
        assert!(err(&format!(
            "{base}[[target.lun]]\nlun=0\npath=\"a\"\nsize=\"1MiB\"\n[[target.lun]]\nlun=0\npath=\"b\"\nsize=\"1MiB\"\n"
        ))
        .contains("target[0].lun[1].lun"));
    }

    #[test]
    fn external_interfaces_are_read_and_checked_by_key() {
        let base = "[server]\nportals=[\"127.0.0.1:3260\"]\n[[target]]\niqn=\"iqn.2026-11.x:t\"\n[packets]\n[packets.external]\n";
        let one = "[[packets.external.interface]]\nname=\"fx1\"\naddress=\"10.200.1.1/30\"\nprobe=\"198.51.100.1\"\npriority=10\n";
        let c = Config::parse(&format!("{base}echo=\"mon0\"\n{one}")).expect("valid");
        let x = c
            .packets
            .as_ref()
            .and_then(|p| p.external.as_ref())
            .expect("external");
        let ifs = x.interfaces_config().expect("checked").expect("some");
        let i = &ifs.interfaces[0];
        assert_eq!(i.address, Some(("10.200.1.1".parse().expect("ip"), 30)));
        assert_eq!(i.local, Some("10.200.1.2".parse().expect("ip")), "derived");
        assert_eq!((i.mtu, i.priority, i.probe_misses), (1500, 10, 3));
        assert_eq!(i.probe_interval, Duration::from_millis(200));
        assert_eq!(ifs.echo.as_deref(), Some("mon0"));
        assert_eq!(ifs.backlog_bytes_max, 4 << 20);
        assert!(x.bind.is_none(), "no UDP tunnel");
        let cases = [
            (base.to_string(), "packets.external"),
            (
                format!("{base}peers=[\"127.0.0.1:1\"]\n"),
                "packets.external.bind",
            ),
            (
                format!("{base}{}", one.replace("/30", "")),
                "packets.external.interface[0].address",
            ),
            (
                format!("{base}{}", one.replace("/30", "/33")),
                "packets.external.interface[0].address",
            ),
            (
                format!("{base}{}", one.replace("/30", "/32")),
                "packets.external.interface[0].probe",
            ),
            (
                format!("{base}{one}{one}"),
                "packets.external.interface[1].name",
            ),
            (
                format!("{base}{}", one.replace("fx1", "a-very-long-interface")),
                "packets.external.interface[0].name",
            ),
            (
                format!("{base}{one}mtu=40\n"),
                "packets.external.interface[0].mtu",
            ),
            (
                format!("{base}{one}probe_misses=0\n"),
                "packets.external.interface[0].probe_misses",
            ),
            (
                format!("{base}echo=\"fx1\"\n{one}"),
                "packets.external.echo",
            ),
            (
                format!("{base}{one}hold_down_ms=99999999999\n"),
                "packets.external.interface[0].hold_down_ms",
            ),
        ];
        for (text, key) in cases {
            let e = err(&text);
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn lun_masking_names_are_checked_by_key() {
        let base = "[server]\nportals=[\"127.0.0.1:3260\"]\n[[target]]\niqn=\"iqn.2026-11.org.ftss:t\"\n[[target.lun]]\nlun=0\npath=\"a.img\"\nsize=\"1MiB\"\n";
        assert!(err(&format!("{base}initiators=[\"not a name\"]\n"))
            .contains("target[0].lun[0].initiators[0]"));
        let c = Config::parse(&format!("{base}initiators=[\"iqn.2026-11.org.ftss:a\"]\n"))
            .expect("valid");
        assert_eq!(
            c.targets[0].luns[0].initiators.as_deref(),
            Some(&["iqn.2026-11.org.ftss:a".to_string()][..])
        );
    }

    #[test]
    fn node_chap_and_reset_initiators_are_checked_and_looked_up_by_name() {
        let base = "[server]\nportals=[\"127.0.0.1:3260\"]\n[[target]]\niqn=\"iqn.2026-11.x:t\"\n";
        let node = "[[node]]\ninitiator=\"iqn.2026-11.x:n1\"\naddresses=[\"10.0.0.1\"]\n";
        assert!(err(&format!(
            "{base}{node}[node.chap]\nusername=\"n1\"\nsecret=\"short\"\n"
        ))
        .contains("node[0].chap.secret"));
        assert!(err(&format!(
            "{base}{node}[node.chap]\nusername=\"n1\"\nsecret=\"n1-secret-123\"\nmutual_username=\"t\"\n"
        ))
        .contains("node[0].chap.mutual_secret"));
        assert!(err(&format!(
            "{base}{node}[node.chap]\nusername=\"n1\"\nsecret=\"n1-secret-123\"\n[[node]]\ninitiator=\"IQN.2026-11.X:N1\"\naddresses=[\"10.0.0.2\"]\n"
        ))
        .contains("node[0].chap"));
        assert!(err(&format!("{base}reset_initiators=[\"not a name\"]\n"))
            .contains("target[0].reset_initiators[0]"));
        let c = Config::parse(&format!(
            "{base}reset_initiators=[\"iqn.2026-11.x:admin\"]\n{node}[node.chap]\nusername=\"n1\"\nsecret=\"n1-secret-123\"\n"
        ))
        .expect("valid");
        assert_eq!(
            c.node_chap("IQN.2026-11.x:N1").map(|c| c.username.as_str()),
            Some("n1")
        );
        assert!(c.node_chap("iqn.2026-11.x:n2").is_none());
        assert!(c.targets[0].may_reset("iqn.2026-11.X:admin"));
        assert!(!c.targets[0].may_reset("iqn.2026-11.x:n1"));
        assert!(Config::default_config().targets[0]
            .reset_initiators
            .is_empty());
    }
}
