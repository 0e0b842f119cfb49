//! CHAP, both roles, with keys from the fuzzer. Target side: it accepts a response only
//! when CHAP_N and CHAP_R are right (the harness computes the right answer itself), never
//! answers a reflected challenge, and says nothing after it is done. Initiator side: it
//! accepts the target's mutual answer only when it is right. Byte 0 lets the fuzzer put
//! the right CHAP_R in, so the paths behind a correct response are explored too.
#![no_main]

use ftss_fuzz::Input;
use ftss_proto::chap::{encode_hex, Algorithm, ChapInitiator, ChapSecrets, ChapStep, ChapTarget};
use ftss_proto::text;
use libfuzzer_sys::fuzz_target;

const CHALLENGE: [u8; 16] = *b"0123456789abcdef";
const ID: u8 = 7;

fn keys(input: &mut Input<'_>) -> Option<Vec<(String, String)>> {
    let len = usize::from(input.u16());
    text::parse(input.take(len)).ok()
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let secrets = ChapSecrets {
        username: "user".into(),
        secret: b"initiator-secret".to_vec(),
        mutual: (flags & 2 != 0).then(|| ("target".into(), b"target-secret!".to_vec())),
    };
    let mut t = ChapTarget::new(secrets.clone(), ID, CHALLENGE.to_vec());
    let Some(first) = keys(&mut input) else {
        return;
    };
    let alg = match t.handle(&first) {
        Ok(ChapStep::Send(out)) => {
            let a = out
                .iter()
                .find(|(k, _)| k == "CHAP_A")
                .expect("CHAP_A chosen");
            let n: u64 = a.1.parse().expect("numeric CHAP_A");
            let alg = Algorithm::from_number(n).expect("a known algorithm");
            assert!(out
                .iter()
                .any(|(k, v)| k == "CHAP_C" && *v == encode_hex(&CHALLENGE)));
            alg
        }
        Ok(ChapStep::Done(_)) => panic!("authenticated before any response"),
        Err(_) => return,
    };
    let Some(mut second) = keys(&mut input) else {
        return;
    };
    let right = alg.response(ID, &secrets.secret, &CHALLENGE);
    if flags & 1 != 0 {
        second.retain(|(k, _)| k != "CHAP_R" && k != "CHAP_N");
        second.push(("CHAP_N".into(), "user".into()));
        second.push(("CHAP_R".into(), encode_hex(&right)));
    }
    let first_of = |k: &str| second.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let result = t.handle(&second);
    if let Ok(ChapStep::Done(answer)) = &result {
        assert_eq!(
            first_of("CHAP_N").as_deref(),
            Some("user"),
            "wrong name accepted"
        );
        let r = first_of("CHAP_R").expect("a response was given");
        let r = ftss_proto::chap::decode_binary(&r, "CHAP_R").expect("it decoded");
        assert_eq!(r, right, "wrong response accepted");
        if !answer.is_empty() {
            let c = first_of("CHAP_C").expect("mutual answer only to a challenge");
            let c = ftss_proto::chap::decode_binary(&c, "CHAP_C").expect("decoded");
            assert_ne!(
                c,
                CHALLENGE.to_vec(),
                "answered our own challenge reflected"
            );
            assert!(
                secrets.mutual.is_some(),
                "mutual answer without mutual secrets"
            );
        }
        assert!(
            t.handle(&second).is_err(),
            "keys after authentication accepted"
        );
    }

    // The initiator side, answering a challenge and checking a mutual answer.
    let mine = b"initiator-chal-1".to_vec();
    let mut i = ChapInitiator::new(
        "user".into(),
        b"initiator-secret".to_vec(),
        Some(("target".into(), b"target-secret!".to_vec(), 9, mine.clone())),
    );
    let Some(challenge) = keys(&mut input) else {
        return;
    };
    let Ok(resp) = i.respond(&challenge) else {
        return;
    };
    assert!(resp.iter().any(|(k, _)| k == "CHAP_R"));
    let Some(mut answer) = keys(&mut input) else {
        return;
    };
    let a = challenge
        .iter()
        .find(|(k, _)| k == "CHAP_A")
        .and_then(|(_, v)| v.parse().ok())
        .and_then(Algorithm::from_number)
        .expect("respond accepted the algorithm");
    let right = a.response(9, b"target-secret!", &mine);
    if flags & 4 != 0 {
        answer.retain(|(k, _)| k != "CHAP_R" && k != "CHAP_N");
        answer.push(("CHAP_N".into(), "target".into()));
        answer.push(("CHAP_R".into(), encode_hex(&right)));
    }
    if i.verify(&answer).is_ok() {
        let get = |k: &str| answer.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CHAP_N"), Some("target"), "wrong target name accepted");
        let r = ftss_proto::chap::decode_binary(get("CHAP_R").expect("given"), "CHAP_R");
        assert_eq!(r.expect("decoded"), right, "wrong mutual response accepted");
    }
});
