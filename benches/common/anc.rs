//! The ANC visit workload of the forms bench (issue 4), shared with the JetStream engine bench
//! so that both submit the same forms: 200 users in 40 case-sharing groups, a case-sharing app;
//! form `i` is an ANC visit (`demo::form` plus question data, about 3 KB) by a random user with
//! two case blocks: the pregnancy case (a create without `owner_id` in one form of four, so the
//! server resolves the owner to the user's group (R38); otherwise an update of a case registered
//! at least [`UPDATE_LAG`] forms earlier, read back from the projections) and a new visit case.

use super::{group, mix, user, uuid_like, GROUPS, USERS};

use caseledger::demo::{form, Block};
use caseledger::domain::{AppId, Command, GroupId, Timestamp, UserId};
use caseledger::Request;

/// The case-sharing app every form is submitted to.
pub const APP: &str = "app-anc";
/// Updates pick cases registered at least this many forms earlier, so they are committed.
pub const UPDATE_LAG: u64 = 4096;
/// 2026-03-02T06:15:22.104Z.
pub const BASE_TIME: i64 = 1_772_432_122_104;

/// Question data outside the case blocks, about 1.7 KB, as a real ANC visit form carries.
pub fn questions(i: u64) -> String {
    format!(
        "  <visit_type>anc</visit_type><visit_number>{}</visit_number><visit_date>2026-03-{:02}</visit_date>\n  \
         <vitals><hb_level>11.{}</hb_level><bp_systolic>1{:02}</bp_systolic><bp_diastolic>{}</bp_diastolic><weight_kg>6{}.5</weight_kg><muac_cm>2{}.0</muac_cm><temperature>36.{}</temperature></vitals>\n  \
         <danger_signs><bleeding>no</bleeding><headache>no</headache><blurred_vision>no</blurred_vision><fever>no</fever><swelling>no</swelling><reduced_movement>no</reduced_movement></danger_signs>\n  \
         <counselling><nutrition>yes</nutrition><birth_plan>yes</birth_plan><hiv_test>declined</hiv_test><itn_use>yes</itn_use><breastfeeding>yes</breastfeeding><family_planning>discussed</family_planning></counselling>\n  \
         <supplements><iron_folate>given</iron_folate><calcium>given</calcium><deworming>not_due</deworming><ipt_dose>{}</ipt_dose></supplements>\n  \
         <next_visit>2026-04-{:02}</next_visit><referral_needed>no</referral_needed><gps>-1.3133 36.7892 1650.0 12.0</gps>\n  \
         <obstetric_history><gravida>2</gravida><parity>1</parity><previous_csection>no</previous_csection><previous_stillbirth>no</previous_stillbirth><previous_preterm>no</previous_preterm></obstetric_history>\n  \
         <household><members>{}</members><water_source>piped</water_source><latrine>shared</latrine><distance_to_facility_km>3.5</distance_to_facility_km><transport_plan>boda_boda</transport_plan></household>\n  \
         <chw_notes>Client reports feeling well; reminded about the clinic visit, iron tablets and the birth plan. Husband present; both agreed to deliver at the facility.</chw_notes>\n",
        1 + i % 8,
        1 + i % 28,
        i % 10,
        i % 40,
        70 + i % 20,
        i % 10,
        3 + i % 5,
        i % 10,
        1 + i % 3,
        1 + i % 28,
        2 + i % 6
    )
}

/// Form `i` of the workload, as the bytes a phone would send.
pub fn raw_form(i: u64) -> Vec<u8> {
    let u = mix(i) % USERS;
    let submitter = user(u);
    let date = Timestamp(BASE_TIME + 1000 * i64::try_from(i).unwrap_or(0)).to_string();
    let register = i % 4 == 0 || i < UPDATE_LAG;
    // Form `k` registers case `k` when it registers; every `k % 4 == 0` does.
    let pregnancy = if register {
        uuid_like(0x3f9b_6a52, i)
    } else {
        let registered = ((i - UPDATE_LAG) / 4).max(1);
        uuid_like(0x3f9b_6a52, mix(i ^ 0xabc) % registered * 4)
    };
    let name = format!("Client {}", i / 4);
    let visit = uuid_like(0x5a11_0000, i);
    let hb = format!("11.{}", i % 10);
    let next = format!("2026-04-{:02}", 1 + i % 28);
    let visits = (1 + i % 8).to_string();
    let pregnancy_update: &[(&str, &str)] = &[
        ("anc_visits", &visits),
        ("last_visit_hb", &hb),
        ("danger_signs", "none"),
        ("next_visit", &next),
        ("birth_plan", "facility"),
        ("edd", "2026-09-01"),
        ("lmp", "2025-11-25"),
        ("gravida", "2"),
    ];
    let visit_update: &[(&str, &str)] = &[
        ("visit_type", "anc"),
        ("hb_level", &hb),
        ("bp", "120/80"),
        ("weight_kg", "64.5"),
        ("iron_folate", "given"),
        ("counselled", "yes"),
    ];
    let blocks = [
        Block {
            case_id: &pregnancy,
            user: &submitter,
            date: &date,
            create: register.then_some(("pregnancy", name.as_str(), None)),
            update: pregnancy_update,
            close: false,
        },
        Block {
            case_id: &visit,
            user: &submitter,
            date: &date,
            create: Some(("visit", "ANC visit", None)),
            update: visit_update,
            close: false,
        },
    ];
    let mut raw = form(&uuid_like(0x3d30_7d25, i), &submitter, &blocks);
    let at = raw.iter().position(|b| *b == b'\n').map_or(0, |p| p + 1);
    raw.splice(at..at, questions(i).into_bytes());
    raw
}

pub fn directory() -> Vec<Request> {
    let mut out = Vec::new();
    for u in 0..USERS {
        out.push(Command::CreateUser {
            id: UserId::new(user(u)),
            username: format!("worker{u}"),
        });
    }
    for g in 0..GROUPS {
        out.push(Command::CreateGroup {
            id: GroupId::new(group(g)),
            name: format!("CHW team {g}"),
            case_sharing: true,
        });
    }
    for u in 0..USERS {
        out.push(Command::AddMember {
            group: GroupId::new(group(u)),
            user: UserId::new(user(u)),
        });
    }
    out.push(Command::CreateApp {
        id: AppId::new(APP),
        name: "ANC".into(),
        case_sharing: true,
        case_types: vec!["pregnancy".into(), "visit".into()],
    });
    out.into_iter().map(Request::new).collect()
}
