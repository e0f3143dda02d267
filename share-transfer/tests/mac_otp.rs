//! One-time pad + Wegman–Carter MAC: any flipped bit in ciphertext or tag is rejected, and a
//! tag never verifies under a different key.

#[path = "../../sharing/tests/common/mod.rs"]
mod common;

use common::data;
use share_transfer::auth::{self, AuthError, Mac, KEY_LEN};
use share_transfer::otp;

#[test]
fn encrypt_then_mac_detects_every_bit_flip() {
    let plain = data(300, 1);
    let pad = data(300, 2);
    let mac_key = data(KEY_LEN, 3);
    let mut ct = plain.clone();
    otp::apply(&mut ct, &pad).expect("lengths");
    let tag = auth::tag(&mac_key, &ct).expect("key");
    auth::verify(&mac_key, &ct, &tag.0).expect("genuine verifies");
    for bit in 0..ct.len() * 8 {
        let mut bad = ct.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            auth::verify(&mac_key, &bad, &tag.0),
            Err(AuthError::BadTag),
            "bit {bit}"
        );
    }
    for bit in 0..128 {
        let mut bad = tag.0;
        bad[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            auth::verify(&mac_key, &ct, &bad),
            Err(AuthError::BadTag),
            "tag bit {bit}"
        );
    }
    // Truncation and extension are detected too.
    assert!(auth::verify(&mac_key, &ct[..299], &tag.0).is_err());
    let mut longer = ct.clone();
    longer.push(0);
    assert!(auth::verify(&mac_key, &longer, &tag.0).is_err());
    // Decrypt.
    let mut back = ct.clone();
    otp::apply(&mut back, &pad).expect("lengths");
    assert_eq!(back, plain);
}

#[test]
fn tag_never_verifies_with_wrong_key() {
    let msg = data(1000, 4);
    let key = data(KEY_LEN, 5);
    let tag = auth::tag(&key, &msg).expect("key");
    for bit in 0..KEY_LEN * 8 {
        let mut k2 = key.clone();
        k2[bit / 8] ^= 1 << (bit % 8);
        assert!(auth::verify(&k2, &msg, &tag.0).is_err(), "key bit {bit}");
    }
    for seed in 10..200 {
        let k2 = data(KEY_LEN, seed);
        assert!(auth::verify(&k2, &msg, &tag.0).is_err());
    }
}

#[test]
fn streaming_mac_over_chunks() {
    let msg = data(1 << 20, 6);
    let key = data(KEY_LEN, 7);
    let mut m = Mac::new(&key).expect("key");
    for c in msg.chunks(65_536 + 3) {
        m.update(c);
    }
    let t = m.finalize();
    assert_eq!(t, auth::tag(&key, &msg).expect("key"));
}

#[test]
fn otp_length_mismatch() {
    let mut d = vec![0u8; 10];
    assert_eq!(
        otp::apply(&mut d, &[0u8; 11]),
        Err(otp::OtpError::LengthMismatch { data: 10, key: 11 })
    );
}
