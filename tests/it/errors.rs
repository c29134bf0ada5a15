//! Every rejection code of R50, end to end: the form is rejected with that code, the message
//! says where, and the raw bytes are kept in the log (R49, I7).

use caseledger::domain::{AppId, Command, ErrorCode, Event, GroupId, UserId};
use caseledger::Request;

use crate::support;

const V2: &str = "http://commcarehq.org/case/transaction/v2";

fn form(user: &str, id: &str, block: &str) -> Vec<u8> {
    format!(
        "<?xml version='1.0' ?><data xmlns=\"http://openrosa.org/formdesigner/ERR\">{block}\
         <n1:meta xmlns:n1=\"http://openrosa.org/jr/xforms\"><n1:userID>{user}</n1:userID>\
         <n1:instanceID>{id}</n1:instanceID></n1:meta></data>"
    )
    .into_bytes()
}

fn case(attrs: &str, body: &str) -> String {
    format!("<n0:case xmlns:n0=\"{V2}\" {attrs}>{body}</n0:case>")
}

const CREATE: &str =
    "<n0:create><n0:case_name>N</n0:case_name><n0:case_type>t</n0:case_type></n0:create>";

#[test]
fn r50_every_error_code_rejects_the_form_and_keeps_its_bytes() {
    let (_dir, engine) = support::engine();
    let rt = support::rt();
    for c in [
        Command::CreateUser {
            id: UserId::new("u1"),
            username: "u1".into(),
        },
        Command::CreateUser {
            id: UserId::new("u-alone"),
            username: "alone".into(),
        },
        Command::CreateUser {
            id: UserId::new("u-sup"),
            username: "sup".into(),
        },
        Command::CreateGroup {
            id: GroupId::new("g1"),
            name: "g1".into(),
            case_sharing: true,
        },
        Command::CreateGroup {
            id: GroupId::new("g2"),
            name: "g2".into(),
            case_sharing: true,
        },
        Command::AddMember {
            group: GroupId::new("g1"),
            user: UserId::new("u1"),
        },
        Command::AddMember {
            group: GroupId::new("g1"),
            user: UserId::new("u-sup"),
        },
        Command::AddMember {
            group: GroupId::new("g2"),
            user: UserId::new("u-sup"),
        },
        Command::CreateApp {
            id: AppId::new("app"),
            name: "app".into(),
            case_sharing: true,
            case_types: vec!["t".into()],
        },
    ] {
        rt.block_on(engine.execute(Request::new(c))).expect("setup");
    }
    let ok_attrs = "case_id=\"c1\" date_modified=\"2026-03-02T10:00:00Z\" user_id=\"u1\"";
    let cases: Vec<(ErrorCode, Vec<u8>, &str)> = vec![
        (ErrorCode::InvalidXml, b"<data><unclosed></data>".to_vec(), ""),
        (ErrorCode::InvalidXml, b"<!DOCTYPE d [<!ENTITY a \"aaaa\">]><data>&a;</data>".to_vec(), "DTD"),
        (ErrorCode::UnknownUser, form("u-ghost", "e1", &case(ok_attrs, CREATE)), "u-ghost"),
        (ErrorCode::UnsupportedCaseVersion, form("u1", "e2", "<case xmlns=\"http://commcarehq.org/case/transaction/v1\"><case_id>c1</case_id></case>"), ""),
        (ErrorCode::IllegalCaseId, form("u1", "e3", &case("case_id=\"  \" user_id=\"u1\"", CREATE)), ""),
        (ErrorCode::PhoneDateValueError, form("u1", "e4", &case("case_id=\"c1\" date_modified=\"2015-08-06T14:33:12.077 05:30\"", CREATE)), "c1"),
        (ErrorCode::UsesReferrals, form("u1", "e5", &case(ok_attrs, "<n0:referral><n0:referral_id>r</n0:referral_id></n0:referral>")), "c1"),
        (ErrorCode::CaseValueError, form("u1", "e6", &case(ok_attrs, "<n0:create><n0:case_type>t</n0:case_type></n0:create>")), "c1"),
        (ErrorCode::NoCaseSharingGroup, form("u-alone", "e7", &case("case_id=\"c7\" user_id=\"u-alone\"", CREATE)), "c7"),
        (ErrorCode::MultipleCaseSharingGroups, form("u-sup", "e8", &case("case_id=\"c8\" user_id=\"u-sup\"", CREATE)), "c8"),
        (ErrorCode::InvalidCaseIndex, form("u1", "e9", &case(ok_attrs, &format!("{CREATE}<n0:index><n0:parent>nobody</n0:parent></n0:index>"))), "c1"),
        (ErrorCode::InvalidCaseIndex, form("u1", "e10", &case(ok_attrs, &format!("{CREATE}<n0:index><n0:parent case_type=\"t\">nobody</n0:parent></n0:index>"))), "nobody"),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (code, raw, mentions) in cases {
        let outcome = rt
            .block_on(engine.submit(raw.clone(), Some(AppId::new("app")), None))
            .expect("submit");
        let error = outcome
            .error
            .clone()
            .unwrap_or_else(|| panic!("{code} expected, form accepted"));
        assert_eq!(error.code, code, "{}", error.message);
        assert!(
            error.message.contains(mentions),
            "{code}: message {:?} should name {mentions:?}",
            error.message
        );
        let stored = engine
            .log()
            .read_at_with_raw(outcome.position)
            .expect("decodes")
            .expect("event");
        match stored.event {
            Event::FormRejectedV1(r) => {
                assert_eq!(
                    r.form.raw.bytes(),
                    Some(&raw[..]),
                    "{code}: raw bytes kept verbatim"
                )
            }
            other => panic!("{code}: expected FormRejected, got {other:?}"),
        }
        seen.insert(code);
    }
    assert_eq!(
        seen.len(),
        ErrorCode::PRECEDENCE.len(),
        "every code has a case"
    );
    assert!(
        engine
            .projections()
            .case(&"c1".into())
            .expect("read")
            .is_none(),
        "R49: nothing applied"
    );
}
