//! The vendor commands' parameter and data lists: SEND's packet list, the RECEIVE/REPLAY
//! record list, ACK's sequence list, NODE REGISTER's address list, NODE QUERY and ROUTING
//! TABLE data. Byte 0 picks the list. Invariant: whatever decodes encodes to bytes that
//! decode to the same value, and no decode allocates beyond its input's worth.
#![no_main]

use ftss_proto::vendor::{AckList, AddressList, NodeInfo, RecordList, RouteList, SendList};
use libfuzzer_sys::fuzz_target;

macro_rules! round_trip {
    ($t:ty, $d:expr) => {
        if let Ok(v) = <$t>::decode($d) {
            let bytes = v.encode();
            assert_eq!(<$t>::decode(&bytes), Ok(v), "{} round trip", stringify!($t));
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, d)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => round_trip!(SendList, d),
        1 => round_trip!(RecordList, d),
        2 => round_trip!(AckList, d),
        3 => round_trip!(AddressList, d),
        4 => round_trip!(NodeInfo, d),
        _ => round_trip!(RouteList, d),
    }
});
