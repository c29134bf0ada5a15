//! Unit tests of the pure parts: credential parsing, API key shape, the login throttle.

use std::time::Duration;

use axum::http::HeaderValue;

use crate::auth::{parse_authorization, Presented};
use crate::limit::{Limiter, LoginLimit};
use crate::secret;

#[test]
fn issue10_schemes_are_case_insensitive_and_apikey_splits_on_the_first_colon() {
    let basic = HeaderValue::from_static("bAsIc ZGF2aWQ6cGE6c3M="); // david:pa:ss
    assert_eq!(
        parse_authorization(&basic),
        Some(Presented::Basic {
            login: "david".into(),
            secret: "pa:ss".into()
        })
    );
    for scheme in ["ApiKey", "apikey", "APIKEY"] {
        let v = HeaderValue::from_str(&format!("{scheme} svc:abc.def")).unwrap();
        assert_eq!(
            parse_authorization(&v),
            Some(Presented::ApiKey {
                login: "svc".into(),
                key: "abc.def".into()
            })
        );
    }
    for bad in [
        "Bearer x",
        "Basic !!!",
        "Basic ZGF2aWQ=",
        "ApiKey nocolon",
        "Basic",
    ] {
        assert_eq!(
            parse_authorization(&HeaderValue::from_static(bad)),
            None,
            "{bad}"
        );
    }
}

#[test]
fn issue10_api_keys_are_shown_once_and_only_their_hash_is_kept() {
    let k = secret::new_api_key().unwrap();
    let (id, secret_part) = secret::split_api_key(&k.key).unwrap();
    assert_eq!(id, k.key_id);
    assert!(!k.hash.contains(secret_part));
    assert!(domain::check_argon2id(&k.hash).is_ok());
    assert!(secret::verify(secret_part, &k.hash));
    assert!(!secret::verify("0".repeat(64).as_str(), &k.hash));
    assert_eq!(secret::split_api_key("short.key"), None);
}

#[test]
fn issue10_failed_logins_empty_a_bucket_that_refills_with_time() {
    let limiter = Limiter::new(LoginLimit {
        burst: 2,
        refill: Duration::from_millis(200),
    });
    assert!(limiter.check("a").is_ok());
    limiter.fail("a");
    assert!(limiter.check("a").is_ok());
    limiter.fail("a");
    let wait = limiter.check("a").unwrap_err();
    assert!(wait <= Duration::from_millis(200));
    assert!(limiter.check("b").is_ok(), "buckets are per key");
    std::thread::sleep(Duration::from_millis(220));
    assert!(limiter.check("a").is_ok());
}

#[test]
fn issue10_data_api_dates_take_hq_formats_as_utc_and_round_trip_micros() {
    use crate::data_api::{format_micros, parse_date};
    let day = parse_date("d", "2026-03-02").unwrap();
    assert_eq!(format_micros(day), "2026-03-02T00:00:00.000000Z");
    for (text, shown) in [
        ("2026-03-02T10:20:30", "2026-03-02T10:20:30.000000Z"),
        ("2026-03-02T10:20:30.5", "2026-03-02T10:20:30.500000Z"),
        ("2026-03-02T10:20:30.000199", "2026-03-02T10:20:30.000199Z"),
        ("2026-03-02T10:20Z", "2026-03-02T10:20:00.000000Z"),
    ] {
        assert_eq!(
            format_micros(parse_date("d", text).unwrap()),
            shown,
            "{text}"
        );
    }
    for bad in [
        "2026-03-02T10:20:30Z",
        "2026-3-2",
        "2026-02-30",
        "2026-03-02T10:20:30.1234567",
        "2026-03-02 10:20:30",
        "",
    ] {
        assert!(parse_date("d", bad).is_err(), "{bad}");
    }
}
