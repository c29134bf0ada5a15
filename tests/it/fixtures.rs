//! I6: every event type at every version stays readable. `tests/data/fixtures/events-v1.bin`
//! holds one stored envelope of each v1 event type, written when v1 was current; this test
//! decodes the committed bytes and compares them with the same events built in code.
//! `UPDATE_EXPECT=1` rewrites the file — only ever do that when *adding* a type, never to make an
//! old envelope decode differently; it writes every envelope in today's format, so keep the old
//! envelopes' bytes and append only the new ones (the four credential and sync-token types of
//! issue 10 were appended that way after the fifteen written in formats of their time).

use caseledger::domain::*;
use caseledger::eventlog::{decode_envelope, decode_header, encode_envelope};

fn form(id: &str) -> FormRecord {
    FormRecord {
        form_id: id.into(),
        xmlns: "http://openrosa.org/formdesigner/F".into(),
        app_id: Some("app".into()),
        user_id: Some("u1".into()),
        content_hash: [7; 32],
        raw: b"<data>\x00\xff raw bytes kept verbatim</data>"
            .to_vec()
            .into(),
    }
}

fn block() -> BlockApplied {
    BlockApplied {
        case_id: "c1".into(),
        date: Timestamp(1_767_225_600_123),
        user: "u1".into(),
        actions: Actions {
            create: Some(Create {
                case_type: "pregnancy".into(),
                case_name: "Monica".into(),
                owner_id: Some("g1".into()),
                external_id: Some("ext".into()),
                date_opened: Some(Timestamp(1_767_225_600_000)),
            }),
            update: vec![("edd".into(), "2026-09-01".into())],
            close: true,
            index: vec![IndexChange {
                identifier: "parent".into(),
                case_id: "c0".into(),
                case_type: "household".into(),
                relationship: Relationship::Extension,
            }],
            attachment: vec![AttachmentChange {
                identifier: "photo".into(),
                src: Some("1.jpg".into()),
                from: Some("local".into()),
                name: None,
            }],
        },
    }
}

fn v1_events() -> Vec<Event> {
    vec![
        Event::UserCreatedV1(UserCreatedV1 {
            user_id: "u1".into(),
            username: "david".into(),
        }),
        Event::GroupCreatedV1(GroupCreatedV1 {
            group_id: "g1".into(),
            name: "Team".into(),
            case_sharing: true,
        }),
        Event::GroupCaseSharingSetV1(GroupCaseSharingSetV1 {
            group_id: "g1".into(),
            case_sharing: false,
        }),
        Event::MemberAddedV1(MembershipV1 {
            group_id: "g1".into(),
            user_id: "u1".into(),
        }),
        Event::MemberRemovedV1(MembershipV1 {
            group_id: "g1".into(),
            user_id: "u1".into(),
        }),
        Event::AppCreatedV1(AppCreatedV1 {
            app_id: "app".into(),
            name: "ANC".into(),
            case_sharing: true,
            case_types: vec!["pregnancy".into()],
        }),
        Event::AppCaseSharingSetV1(AppCaseSharingSetV1 {
            app_id: "app".into(),
            case_sharing: false,
        }),
        Event::FormAcceptedV1(FormAcceptedV1 {
            form: form("f1"),
            blocks: vec![block()],
        }),
        Event::FormRejectedV1(FormRejectedV1 {
            form: form("f2"),
            error: Rejection {
                code: ErrorCode::NoCaseSharingGroup,
                message: "no group".into(),
            },
        }),
        Event::FormDuplicateV1(FormDuplicateV1 {
            form: form("f1"),
            original: Position(8),
        }),
        Event::DiagnosticRaisedV1(DiagnosticRaisedV1 {
            diagnostic: Diagnostic {
                code: DiagnosticCode::OutOfOrderEdit,
                subject: "c1".into(),
                detail: "d".into(),
            },
        }),
        Event::FormEditedV1(FormEditedV1 {
            form: form("f1"),
            replaces: Position(8),
            blocks: vec![block()],
        }),
        Event::FormArchivedV1(FormArchiveV1 {
            form_id: "f1".into(),
        }),
        Event::FormUnarchivedV1(FormArchiveV1 {
            form_id: "f1".into(),
        }),
        Event::FormAttachmentsV1(FormAttachmentsV1 {
            form_id: "f1".into(),
            files: vec![AttachmentFile {
                name: "1.jpg".into(),
                bytes: vec![0, 1, 2, 255],
            }],
        }),
        Event::UserPasswordSetV1(UserPasswordSetV1 {
            user_id: "u1".into(),
            hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
        }),
        Event::ApiKeyCreatedV1(ApiKeyCreatedV1 {
            key_id: "k1".into(),
            user_id: "u1".into(),
            role: Role::Service,
            hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
        }),
        Event::ApiKeyRevokedV1(ApiKeyRevokedV1 {
            key_id: "k1".into(),
        }),
        Event::FormLastSyncTokenV1(FormLastSyncTokenV1 {
            form_id: "f1".into(),
            token: "7-abc".into(),
        }),
    ]
}

fn recorded() -> Vec<RecordedEvent> {
    v1_events()
        .into_iter()
        .zip(1u64..)
        .map(|(event, p)| RecordedEvent {
            position: Position(p),
            recorded_at: Timestamp(1_767_225_600_000 + p as i64),
            command_id: CommandId::new(format!("cmd-{p}")),
            event,
        })
        .collect()
}

#[test]
fn i6_v1_envelopes_written_earlier_still_decode_to_the_same_events() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures/events-v1.bin");
    let expected = recorded();
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        let mut out = Vec::new();
        for e in &expected {
            let bytes = encode_envelope(e).expect("encode");
            out.extend_from_slice(&u32::try_from(bytes.len()).expect("size").to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        std::fs::write(&path, out).expect("write fixture");
    }
    let stored = std::fs::read(&path).expect("fixture present");
    let mut rest = stored.as_slice();
    let mut decoded = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        let (one, tail) = tail.split_at(len);
        let header = decode_header(one).expect("header");
        let event = decode_envelope(one).expect("decodes");
        assert_eq!(header.type_name, event.event.type_name());
        assert_eq!(header.type_version, event.event.type_version());
        decoded.push(event);
        rest = tail;
    }
    assert_eq!(decoded, expected);
    let names: std::collections::BTreeSet<&str> =
        decoded.iter().map(|e| e.event.type_name()).collect();
    assert_eq!(names.len(), 19, "one envelope per v1 event type");
}
