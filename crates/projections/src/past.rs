//! A case's recent past, kept in its own row: how to go back from the case now to the case
//! after each of its last [`KEEP`] events, as differences, newest first.
//!
//! A user's case list as of a position reads the owner's range of case rows (`keys`); a case
//! touched since the position needs its state then, which its version row holds, but a point
//! read per case (a sled leaf pulled for each) cost more than the rest of the list. Differences
//! are small (an update changes a few properties, `modified_on` and `xform_ids`), so the row
//! carries them, and the list reads the version row only for a case touched more than
//! [`KEEP`] times since the position.
//!
//! The past covers the events since the case last came into existence: a deleted case has no
//! row, and a revived one starts a new past. It is a function of the case's states after each
//! event (the versions), so the live fold, which extends the stored past, and the bulk rebuild,
//! which builds it from every version, write the same bytes (`replay --verify` compares them).
//!
//! Layout: entries to the end of the value, each `u32 BE length, bincode Back`.

use std::collections::BTreeMap;

use domain::{Attachment, Case, CaseId, FormId, Index, Timestamp};
use serde::{Deserialize, Serialize};

use crate::asof::push_len;
use crate::{codec, ProjectionError};

/// Differences a case row keeps at most: a case touched more often since a position is read
/// from its version row.
pub(crate) const KEEP: usize = 16;

/// Declares the fields of [`Case`] a difference can set, with what reads and applies them.
macro_rules! fields {
    ($($variant:ident: $field:ident: $ty:ty,)*) => {
        /// A field's value before (the variant order is the stored index).
        #[derive(Debug, Serialize, Deserialize)]
        enum Field {
            $($variant($ty),)*
        }

        /// The fields of `older` that differ from `newer`.
        fn changed(newer: &Case, older: &Case) -> Vec<Field> {
            let mut out = Vec::new();
            $(
                if newer.$field != older.$field {
                    out.push(Field::$variant(older.$field.clone()));
                }
            )*
            out
        }

        fn set(case: &mut Case, field: Field) {
            match field {
                $(Field::$variant(v) => case.$field = v,)*
            }
        }
    };
}

fields! {
    CaseId: case_id: CaseId,
    CaseType: case_type: String,
    CaseName: case_name: String,
    OwnerId: owner_id: String,
    UserId: user_id: String,
    ExternalId: external_id: Option<String>,
    OpenedOn: opened_on: Option<Timestamp>,
    OpenedBy: opened_by: Option<String>,
    ModifiedOn: modified_on: Option<Timestamp>,
    ModifiedOnBy: modified_on_by: Option<String>,
    Closed: closed: bool,
    ClosedOn: closed_on: Option<Timestamp>,
    ClosedBy: closed_by: Option<String>,
}

/// How to go from a case to the case one event before it.
#[derive(Debug, Serialize, Deserialize)]
struct Back {
    fields: Vec<Field>,
    /// Each property that differs, with its value before (`None`: unset).
    properties: Vec<(String, Option<String>)>,
    indices: Vec<(String, Option<Index>)>,
    attachments: Vec<(String, Option<Attachment>)>,
    /// `xform_ids` before: the first `keep` of now, then `tail`.
    keep: u32,
    tail: Vec<FormId>,
}

impl Back {
    fn between(newer: &Case, older: &Case) -> Back {
        let keep = newer
            .xform_ids
            .iter()
            .zip(&older.xform_ids)
            .take_while(|(a, b)| a == b)
            .count();
        Back {
            fields: changed(newer, older),
            properties: map_back(&newer.properties, &older.properties),
            indices: map_back(&newer.indices, &older.indices),
            attachments: map_back(&newer.attachments, &older.attachments),
            keep: u32::try_from(keep).unwrap_or(u32::MAX),
            tail: older.xform_ids.get(keep..).unwrap_or_default().to_vec(),
        }
    }

    fn apply(self, case: &mut Case) {
        for f in self.fields {
            set(case, f);
        }
        map_apply(&mut case.properties, self.properties);
        map_apply(&mut case.indices, self.indices);
        map_apply(&mut case.attachments, self.attachments);
        case.xform_ids
            .truncate(usize::try_from(self.keep).unwrap_or(usize::MAX));
        case.xform_ids.extend(self.tail);
    }
}

/// The entries of `older` that differ from `newer`, with their value in `older`.
fn map_back<V: Clone + PartialEq>(
    newer: &BTreeMap<String, V>,
    older: &BTreeMap<String, V>,
) -> Vec<(String, Option<V>)> {
    let mut out: Vec<(String, Option<V>)> = older
        .iter()
        .filter(|(k, v)| newer.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    out.extend(
        newer
            .keys()
            .filter(|k| !older.contains_key(*k))
            .map(|k| (k.clone(), None)),
    );
    out
}

fn map_apply<V>(map: &mut BTreeMap<String, V>, back: Vec<(String, Option<V>)>) {
    for (k, v) in back {
        match v {
            Some(v) => map.insert(k, v),
            None => map.remove(&k),
        };
    }
}

/// The past of a case whose states after its latest events are `states` (oldest first; the
/// last is the case now), given the state before them, `base`, and the past stored with it,
/// `before`. Empty when the case is deleted now.
pub(crate) fn extend(
    key: &[u8],
    base: Option<&Case>,
    before: &[u8],
    states: &[Option<&Case>],
) -> Result<Vec<u8>, ProjectionError> {
    let mut out = Vec::new();
    let Some((Some(mut newer), rest)) = states.split_last().map(|(l, r)| (*l, r)) else {
        return Ok(out);
    };
    let mut n = 0;
    for older in rest.iter().rev().copied().chain(std::iter::once(base)) {
        // A deleted state ends the past: the case came into existence after it.
        let Some(older) = older else {
            return Ok(out);
        };
        if n == KEEP {
            return Ok(out);
        }
        let entry = codec::encode(&Back::between(newer, older));
        push_len(&mut out, entry.len());
        out.extend_from_slice(&entry);
        n += 1;
        newer = older;
    }
    // Back at `base`: its own past follows.
    let mut at = 0;
    while n < KEEP {
        let Some(entry) = next(key, before, &mut at)? else {
            break;
        };
        push_len(&mut out, entry.len());
        out.extend_from_slice(entry);
        n += 1;
    }
    Ok(out)
}

/// The entry of `past` at `at`, moving `at` past it; `None` at the end.
fn next<'b>(
    key: &[u8],
    past: &'b [u8],
    at: &mut usize,
) -> Result<Option<&'b [u8]>, ProjectionError> {
    if *at == past.len() {
        return Ok(None);
    }
    let bad = || ProjectionError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("past of {} bytes is cut short at {at}", past.len()),
    };
    let len = past
        .get(*at..*at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(bad)?;
    let start = *at + 4;
    let entry = start
        .checked_add(len)
        .and_then(|end| past.get(start..end))
        .ok_or_else(bad)?;
    *at = start + len;
    Ok(Some(entry))
}

/// The case `steps` events back from `case`, through its `past`; `None` when the past is
/// shorter.
pub(crate) fn back(
    key: &[u8],
    mut case: Case,
    past: &[u8],
    steps: usize,
) -> Result<Option<Case>, ProjectionError> {
    let mut at = 0;
    for _ in 0..steps {
        let Some(entry) = next(key, past, &mut at)? else {
            return Ok(None);
        };
        codec::decode::<Back>(key, entry)?.apply(&mut case);
    }
    Ok(Some(case))
}

/// Number of entries of a past, for `replay --verify`'s summaries.
pub(crate) fn len(key: &[u8], past: &[u8]) -> Result<usize, ProjectionError> {
    let mut at = 0;
    let mut n = 0;
    while next(key, past, &mut at)?.is_some() {
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A case after its `n`th event: every kind of field changes now and then.
    fn state(n: usize) -> Case {
        let mut c = Case::empty(CaseId::new("c1"));
        c.case_type = "t".into();
        c.case_name = format!("name {}", n / 3);
        c.owner_id = if n % 7 < 4 { "g1" } else { "g2" }.into();
        c.modified_on = Some(Timestamp(i64::try_from(n).unwrap()));
        c.closed = n % 5 == 4;
        c.properties.insert("visits".into(), n.to_string());
        if n % 2 == 0 {
            c.properties.insert("even".into(), "yes".into());
        }
        if n % 4 == 1 {
            c.indices.insert(
                "parent".into(),
                Index {
                    case_id: CaseId::new(format!("p{n}")),
                    case_type: "t".into(),
                    relationship: domain::Relationship::Child,
                },
            );
        }
        if n % 3 == 0 {
            c.attachments.insert(
                "photo".into(),
                Attachment {
                    src: Some(format!("{n}.jpg")),
                    from: None,
                    name: None,
                },
            );
        }
        // Form ids appended, and once in a while rebuilt in another order (an edit, R58).
        c.xform_ids = (0..=n).map(|i| FormId::new(format!("f{i}"))).collect();
        if n % 6 == 5 {
            c.xform_ids.reverse();
        }
        c
    }

    /// Going back k events through the past gives the state after the k-th last event, up to
    /// KEEP events back; further back the past says it does not reach.
    #[test]
    fn the_past_goes_back_exactly_up_to_keep_events() {
        let states: Vec<Case> = (0..KEEP + 5).map(state).collect();
        let refs: Vec<Option<&Case>> = states.iter().map(Some).collect();
        let past = extend(b"k", None, &[], &refs).unwrap();
        assert_eq!(len(b"k", &past).unwrap(), KEEP);
        let now = states.last().unwrap().clone();
        for steps in 0..=KEEP {
            let want = &states[states.len() - 1 - steps];
            assert_eq!(
                back(b"k", now.clone(), &past, steps).unwrap().as_ref(),
                Some(want),
                "{steps} back"
            );
        }
        assert_eq!(back(b"k", now, &past, KEEP + 1).unwrap(), None);
    }

    /// Extending a stored past batch by batch (the live fold) writes the bytes that building it
    /// from every version at once (the bulk rebuild) writes.
    #[test]
    fn extending_batch_by_batch_equals_building_at_once() {
        let states: Vec<Case> = (0..KEEP + 9).map(state).collect();
        let refs: Vec<Option<&Case>> = states.iter().map(Some).collect();
        let whole = extend(b"k", None, &[], &refs).unwrap();
        for cut in [1, 3, KEEP, KEEP + 4] {
            let first = extend(b"k", None, &[], &refs[..cut]).unwrap();
            let second = extend(b"k", Some(&states[cut - 1]), &first, &refs[cut..]).unwrap();
            assert_eq!(second, whole, "cut at {cut}");
        }
    }

    /// A deleted state ends the past: the case came back into existence after it (R57).
    #[test]
    fn a_deletion_ends_the_past() {
        let states: Vec<Case> = (0..6).map(state).collect();
        let refs = vec![
            Some(&states[0]),
            Some(&states[1]),
            None,
            Some(&states[3]),
            Some(&states[4]),
        ];
        let past = extend(b"k", None, &[], &refs).unwrap();
        assert_eq!(len(b"k", &past).unwrap(), 1);
        let live = extend(b"k", None, &[], &refs[3..]).unwrap();
        assert_eq!(past, live);
        assert_eq!(
            extend(b"k", Some(&states[0]), &past, &[None]).unwrap(),
            Vec::<u8>::new()
        );
        assert!(back(b"k", states[4].clone(), &past[..past.len() - 1], 1).is_err());
    }
}
