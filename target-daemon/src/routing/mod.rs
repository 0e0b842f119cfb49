//! Network packets over the storage fabric: the routing agent (vendor commands), its
//! routing table, the packet queue on the fault-tolerant media, and the external port
//! (a UDP tunnel, and TUN interfaces of the target host).

pub mod agent;
pub mod clock;
pub mod external;
pub mod interfaces;
pub mod linkwatch;
pub mod netif;
pub mod packet_queue;
pub mod table;

pub use agent::{AgentConfig, AgentError, RoutingAgent};
