//! Known-answer vector for the (2,3) XOR scheme from the research notes
//! (shared/research/sharing.md §1.4), 8-byte pieces.

mod common;

use common::Replay;
use sharing::scheme::subsets;
use sharing::{Combiner, Scheme, Splitter};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn kurihara_2_3_vector() {
    let k = b"genome-backup-01".to_vec();
    assert_eq!(k, hex("67656e6f6d652d6261636b75702d3031"));
    let r: Vec<u8> = (0..16u32).map(|i| ((37 * i + 11) % 256) as u8).collect();
    assert_eq!(r, hex("0b30557a9fc4e90e33587da2c7ec1136"));
    let want = [
        hex("0b30557a9fc4e90e543d13cdaa893c54"),
        hex("6a533e0fefe9d93f33587da2c7ec1136"),
        hex("6c553b15f2a1c46c523b16d7b7c12107"),
    ];
    let scheme = Scheme::xor(2, 3).expect("valid");
    for general in [false, true] {
        let mut sp = Splitter::new(scheme, 16, Replay::new(r.clone())).expect("ok");
        if general {
            sp = sp.without_fast_path();
        }
        let mut shares = vec![vec![0u8; 16]; 3];
        sp.split_chunk(&k, &mut shares).expect("split");
        assert_eq!(shares, want, "general path: {general}");
    }
    for set in subsets(3, 2) {
        let idx: Vec<u8> = set.iter().map(|&i| i as u8).collect();
        let c = Combiner::new(scheme, 16, &idx).expect("ok");
        let mut out = vec![0u8; 16];
        c.combine_chunk(&[&want[set[0]], &want[set[1]]], &mut out)
            .expect("ok");
        assert_eq!(out, k, "{set:?}");
    }
}
