//! The credential commands: `user create --password…`, `user set-password`, `apikey …`.
//!
//! Secrets are hashed here (argon2id, `server::secret`) and only the hash goes into a command,
//! so the log and its exports hold hashes, never a password or a key. An API key is printed
//! once, when it is created.

use std::io::Read;

use anyhow::{bail, Context, Result};
use caseledger::domain::{ApiKeyId, Command, Role, UserId};
use caseledger::{Engine, Request};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::{out, print_line};

/// Where a new password comes from.
#[derive(Args, Debug, Clone)]
#[group(multiple = false)]
pub(crate) struct PasswordArgs {
    /// The password (visible in the process list and shell history; prefer --password-stdin).
    #[arg(long)]
    password: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    password_stdin: bool,
}

/// `user set-password`.
#[derive(Args, Debug, Clone)]
pub(crate) struct SetPasswordArgs {
    /// The user's id.
    id: String,
    #[command(flatten)]
    password: PasswordArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum RoleArg {
    /// Everything in the project space.
    Admin,
    /// Read everything and submit forms.
    Service,
    /// Read everything, write nothing.
    Auditor,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::Service => Role::Service,
            RoleArg::Auditor => Role::Auditor,
        }
    }
}

/// API keys of services and auditors.
#[derive(Subcommand, Debug)]
pub(crate) enum ApiKeyCmd {
    /// Create a key for a user and print it (once: only its hash is kept).
    #[command(after_help = "\
Examples:
  caseledger apikey create --user u-audit --role auditor
  caseledger --json apikey create --user svc-export --role service")]
    Create {
        /// The user the key authenticates as.
        #[arg(long)]
        user: String,
        /// What the key may do.
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// Revoke a key: it never authenticates again.
    #[command(after_help = "\
Examples:
  caseledger apikey revoke 3f2a9c0d1e4b5a67")]
    Revoke {
        /// The key's id (the part before the dot).
        key_id: String,
    },
    /// List the keys: id, user, role, revoked.
    #[command(after_help = "\
Examples:
  caseledger apikey list
  caseledger --json apikey list")]
    List,
}

/// Passwords longer than this are refused (argon2 takes any length; a bound keeps stdin sane).
const MAX_PASSWORD: usize = 1024;

impl PasswordArgs {
    /// The password, if one was given.
    fn read(&self) -> Result<Option<String>> {
        let password = match (&self.password, self.password_stdin) {
            (Some(p), _) => p.clone(),
            (None, true) => {
                let mut buf = Vec::new();
                std::io::stdin()
                    .lock()
                    .take(MAX_PASSWORD as u64 + 2)
                    .read_to_end(&mut buf)
                    .context("reading the password from standard input")?;
                let text = String::from_utf8(buf).context("the password is not UTF-8")?;
                text.lines().next().unwrap_or_default().to_owned()
            }
            (None, false) => return Ok(None),
        };
        if password.is_empty() {
            bail!("the password is empty");
        }
        if password.len() > MAX_PASSWORD {
            bail!("the password is longer than {MAX_PASSWORD} bytes");
        }
        Ok(Some(password))
    }
}

fn set_password_command(user: &str, password: &str) -> Result<Command> {
    Ok(Command::SetPassword {
        user: UserId::new(user),
        hash: server::secret::hash(password)?,
    })
}

/// `user create`, with a password when one is given (both events in one append).
pub(crate) async fn create_user(
    engine: &Engine,
    json: bool,
    id: &str,
    username: &str,
    password: &PasswordArgs,
) -> Result<u8> {
    let mut requests = vec![Request::new(Command::CreateUser {
        id: UserId::new(id),
        username: username.to_owned(),
    })];
    if let Some(p) = password.read()? {
        requests.push(Request::new(set_password_command(id, &p)?));
    }
    let mut last = None;
    let mut events = 0;
    for outcome in engine.execute_many(requests).await? {
        let outcome = outcome?;
        events += outcome.events.len();
        last = outcome.events.last().map(|e| e.position.0).or(last);
    }
    report(json, last, events, &format!("user {id} created"))
}

/// `user set-password`.
pub(crate) async fn set_password(
    engine: &Engine,
    json: bool,
    args: &SetPasswordArgs,
) -> Result<u8> {
    let Some(password) = args.password.read()? else {
        bail!("give the password with --password or --password-stdin");
    };
    let cmd = set_password_command(&args.id, &password)?;
    let outcome = engine.execute(Request::new(cmd)).await?;
    let last = outcome.events.last().map(|e| e.position.0);
    report(
        json,
        last,
        outcome.events.len(),
        &format!("password of {} set", args.id),
    )
}

/// `apikey …`.
pub(crate) async fn apikey(engine: &Engine, json: bool, cmd: &ApiKeyCmd) -> Result<u8> {
    match cmd {
        ApiKeyCmd::Create { user, role } => {
            let key = server::secret::new_api_key()?;
            let role = Role::from(*role);
            let outcome = engine
                .execute(Request::new(Command::CreateApiKey {
                    key_id: key.key_id.clone(),
                    user: UserId::new(user.as_str()),
                    role,
                    hash: key.hash,
                }))
                .await?;
            let position = outcome.events.last().map(|e| e.position.0);
            if json {
                out(&json!({
                    "key_id": key.key_id.as_str(), "key": key.key, "user": user,
                    "role": role.as_str(), "position": position,
                }))?;
            } else {
                print_line(&format!(
                    "API key {} for {user} ({role}); shown once, only its hash is kept:",
                    key.key_id
                ))?;
                print_line(&key.key)?;
            }
            Ok(0)
        }
        ApiKeyCmd::Revoke { key_id } => {
            let outcome = engine
                .execute(Request::new(Command::RevokeApiKey {
                    key_id: ApiKeyId::new(key_id.as_str()),
                }))
                .await?;
            let last = outcome.events.last().map(|e| e.position.0);
            report(
                json,
                last,
                outcome.events.len(),
                &format!("API key {key_id} revoked"),
            )
        }
        ApiKeyCmd::List => {
            let dir = engine.projections().directory();
            if json {
                let keys: Vec<_> = dir
                    .api_keys
                    .iter()
                    .map(|(id, k)| {
                        json!({"key_id": id.as_str(), "user": k.user_id.as_str(),
                               "role": k.role.as_str(), "revoked": k.revoked})
                    })
                    .collect();
                out(&serde_json::Value::Array(keys))?;
            } else {
                print_line(&format!(
                    "{:<16}  {:<24}  {:<7}  revoked",
                    "key_id", "user", "role"
                ))?;
                for (id, k) in &dir.api_keys {
                    print_line(&format!(
                        "{:<16}  {:<24}  {:<7}  {}",
                        id.as_str(),
                        k.user_id.as_str(),
                        k.role.as_str(),
                        if k.revoked { "yes" } else { "no" }
                    ))?;
                }
            }
            Ok(0)
        }
    }
}

fn report(json: bool, last: Option<u64>, events: usize, done: &str) -> Result<u8> {
    if json {
        out(&json!({"ok": true, "position": last, "events": events}))?;
    } else {
        let at = last.map_or("no change".to_owned(), |p| format!("@{p}"));
        print_line(&format!("{done} ({at})"))?;
    }
    Ok(0)
}
