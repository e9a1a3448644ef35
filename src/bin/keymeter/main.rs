//! `keymeter`: the ops CLI. Manages the key-set file (the source of truth) and talks to
//! the filter's admin API.
//!
//! Exit codes: 0 ok, 1 operation failed, 2 usage error. Errors go to stderr as
//! `keymeter: <message>` and never contain a full key.

mod admin_client;
mod args;
mod cmd_key;
mod cmd_keyset;
mod error;
mod keyfile;
mod output;
mod random;
mod usage;

use admin_client::Admin;
use clap::{Args, Parser, Subcommand};
use error::{usage, Result};
use keymeter::core::keyset::document::ScopeDoc;
use output::Output;
use std::path::PathBuf;

const ADMIN_ENV: &str = "KEYMETER_ADMIN";
const TOKEN_ENV: &str = "KEYMETER_ADMIN_TOKEN";

#[derive(Parser, Debug)]
#[command(
    name = "keymeter",
    version,
    about = "Manage keymeter API keys: the key-set file, and the running filter's admin API",
    long_about = "Manage keymeter API keys.\n\n\
        The key-set file (default keyset.json) is the source of truth: `key` commands change it \
        (bumping its version) and, with --push, send the change to the running Envoy as a delta. \
        `keyset push` uploads the whole file.\n\n\
        Exit codes: 0 ok, 1 operation failed, 2 usage error.",
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// Machine-readable JSON on stdout
    #[arg(long, global = true, display_order = 900)]
    json: bool,
    /// Admin API base URL, http://host:port[/prefix]; `usage` takes one per Envoy [env: KEYMETER_ADMIN]
    #[arg(long, global = true, value_name = "URL", display_order = 901)]
    admin: Vec<String>,
    /// Admin API token, sent as `Authorization: Bearer TOKEN` [env: KEYMETER_ADMIN_TOKEN]
    #[arg(long, global = true, value_name = "TOKEN", display_order = 902)]
    token: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, validate and upload the key-set file
    #[command(subcommand)]
    Keyset(KeysetCmd),
    /// Create, list, rotate, disable and revoke keys
    #[command(subcommand)]
    Key(KeyCmd),
    /// Show the running filter's status (GET {admin}/v1/status)
    Status,
    /// Sum per-key usage across Envoys, for billing (GET {admin}/v1/usage)
    #[command(long_about = USAGE_ABOUT)]
    Usage(UsageArgs),
}

const USAGE_ABOUT: &str = "Sum per-key usage across Envoys, for billing: the example billing job.

Pages through GET {admin}/v1/usage on every --admin (one per Envoy; the same token is sent \
to each), adds the counters up and prints, per consumer (default), per key or per plan: \
admitted requests, denied requests (unauthorized + forbidden + rate_limited + quota_exceeded; \
each also in csv and json), cost units, and request/response bytes.

Each Envoy counts from the moment its process started. Its instance_id (in the json output, \
with started_at) changes when it restarts: its counters then start again from zero.

--since-file FILE prints only the change since the last run that used FILE, and updates FILE \
(the totals last seen per instance_id and key lineage). An instance or key FILE does not know \
(first run, a restarted Envoy = a new instance_id) counts from zero. What a restarted Envoy \
counted after the previous run and before its restart is lost: run often (e.g. every few \
minutes) to keep that small. FILE is written before the report is printed; a missing FILE is \
created.

Per key means per lineage: a key and its rotated successors are one row. Per plan uses the \
plan each Envoy last saw the key on. Rows with nothing counted are left out. Two --admin URLs \
that reach the same Envoy (same instance_id) are refused.";

#[derive(Args, Debug)]
struct UsageArgs {
    /// Only this consumer's keys
    #[arg(long)]
    consumer: Option<String>,
    /// Output format (--json means --format json)
    #[arg(long, value_enum)]
    format: Option<usage::Format>,
    /// One row per consumer, per key (lineage) or per plan
    #[arg(long, value_enum, default_value = "consumer")]
    by: usage::By,
    /// Print only the change since the last run with this file, and update it
    #[arg(long, value_name = "FILE")]
    since_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct FileArg {
    /// The key-set file
    #[arg(long, short = 'f', value_name = "FILE", default_value = keyfile::DEFAULT_PATH)]
    file: PathBuf,
}

#[derive(Args, Debug)]
struct PushArg {
    /// Also send the change to the running filter (POST {admin}/v1/keyset/delta)
    #[arg(long)]
    push: bool,
}

#[derive(Subcommand, Debug)]
enum KeysetCmd {
    /// Create a new key-set file (version 1) with empty plans
    Init {
        #[command(flatten)]
        file: FileArg,
        /// A plan to create, empty (repeatable; default: "default")
        #[arg(long, value_name = "NAME", value_parser = args::plan_name)]
        plan: Vec<String>,
        /// Overwrite an existing file
        #[arg(long)]
        force: bool,
    },
    /// Check a key-set file completely (as the filter would)
    Validate {
        /// The key-set file
        #[arg(value_name = "FILE", default_value = keyfile::DEFAULT_PATH)]
        file: PathBuf,
    },
    /// Upload the whole file to the running filter (PUT {admin}/v1/keyset, or a staged
    /// upload in chunks for large files)
    Push {
        #[command(flatten)]
        file: FileArg,
        /// Replace the running set even if its version is newer (?force=true)
        #[arg(long)]
        force: bool,
        /// Files with more keys are sent as a staged upload in chunks of this many keys
        /// (POST /v1/keyset/uploads ...), so no filter callback runs long
        #[arg(long, value_name = "N", default_value_t = 20000, value_parser = clap::value_parser!(u64).range(1..))]
        chunk_keys: u64,
    },
}

/// When a key stops working (`--expires` or `--ttl`).
#[derive(Args, Debug)]
struct ExpiryArgs {
    /// Expiry instant (RFC 3339, e.g. 2030-01-01T00:00:00Z)
    #[arg(long, value_name = "RFC3339", value_parser = args::timestamp, conflicts_with = "ttl")]
    expires: Option<i64>,
    /// Expiry as a duration from now (e.g. 30d, 12h)
    #[arg(long, value_name = "DURATION", value_parser = args::duration_secs)]
    ttl: Option<i64>,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Who the key belongs to (1-64 of A-Z a-z 0-9 _ -)
    #[arg(long)]
    consumer: String,
    /// Plan name (must exist in the file)
    #[arg(long)]
    plan: String,
    #[command(flatten)]
    expiry: ExpiryArgs,
    /// The key is refused before this instant (RFC 3339)
    #[arg(long, value_name = "RFC3339", value_parser = args::timestamp)]
    not_before: Option<i64>,
    /// Allowed calls, METHODS:PREFIX (GET,HEAD:/v1/reports) or PREFIX (/v1, any method); repeatable; none = all
    #[arg(long, value_name = "SCOPE", value_parser = args::scope)]
    scope: Vec<ScopeDoc>,
    /// Allowed client network (10.0.0.0/8, 2001:db8::/32, or an address); repeatable; none = any
    #[arg(long, value_name = "CIDR", value_parser = args::cidr)]
    cidr: Vec<String>,
    /// Metadata forwarded to the backend, name=value; repeatable
    #[arg(long, value_name = "NAME=VALUE", value_parser = args::meta)]
    meta: Vec<(String, String)>,
    #[command(flatten)]
    file: FileArg,
    #[command(flatten)]
    push: PushArg,
}

#[derive(Args, Debug)]
struct IdArgs {
    /// Key id (the 12 characters after `km_`)
    #[arg(value_name = "ID")]
    id: String,
    #[command(flatten)]
    file: FileArg,
    #[command(flatten)]
    push: PushArg,
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    /// Generate a new key and add its hash to the file; prints the key once
    Create(CreateArgs),
    /// Remove a key: it stops working at once
    Revoke(IdArgs),
    /// Turn a key off (kept in the file; `key enable` turns it back on)
    Disable(IdArgs),
    /// Turn a disabled key back on
    Enable(IdArgs),
    /// Replace a key by a new one; the old key keeps working for --overlap
    #[command(
        long_about = "Replace a key by a new one with the same consumer, plan, scopes, CIDRs, \
        metadata and limits. The new key's lineage is the old key's lineage (or its id), so rate-limit \
        state and usage carry over. The old key keeps working for --overlap (an earlier expiry is kept). \
        The new key gets no expiry unless --expires or --ttl is given."
    )]
    Rotate {
        #[command(flatten)]
        key: IdArgs,
        /// How long the old key keeps working (e.g. 24h); an earlier existing expiry is kept
        #[arg(long, value_name = "DURATION", value_parser = args::duration_secs)]
        overlap: i64,
        /// The new key's expiry (default: none)
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Move a key to another plan
    SetPlan {
        #[command(flatten)]
        key: IdArgs,
        /// The new plan (must exist in the file)
        #[arg(value_name = "PLAN")]
        plan: String,
    },
    /// List keys: id, consumer, plan, state, expiry
    List {
        #[command(flatten)]
        file: FileArg,
    },
}

/// What every command gets: output mode and the admin API settings.
pub struct Ctx {
    pub out: Output,
    admin_urls: Vec<String>,
    token: Option<String>,
}

impl Ctx {
    /// The admin API client; a usage error when no URL (or several) was given.
    pub fn admin(&self, what: &str) -> Result<Admin> {
        match self.admins(what)?.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(usage(format!("{what} takes one --admin URL"))),
        }
    }

    /// One admin API client per --admin URL (or KEYMETER_ADMIN); at least one.
    pub fn admins(&self, what: &str) -> Result<Vec<Admin>> {
        if self.admin_urls.is_empty() {
            return Err(usage(format!(
                "{what} needs the admin API URL: --admin URL or {ADMIN_ENV}"
            )));
        }
        self.admin_urls
            .iter()
            .map(|u| Admin::new(u, self.token.clone()).map_err(usage))
            .collect()
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn run(cli: Cli) -> Result<()> {
    let ctx = Ctx {
        out: Output { json: cli.global.json },
        admin_urls: if cli.global.admin.is_empty() {
            env_nonempty(ADMIN_ENV).into_iter().collect()
        } else {
            cli.global.admin
        },
        token: cli.global.token.or_else(|| env_nonempty(TOKEN_ENV)),
    };
    match cli.command {
        Command::Keyset(KeysetCmd::Init { file, plan, force }) => cmd_keyset::init(&ctx, &file.file, plan, force),
        Command::Keyset(KeysetCmd::Validate { file }) => cmd_keyset::validate(&ctx, &file),
        Command::Keyset(KeysetCmd::Push {
            file,
            force,
            chunk_keys,
        }) => cmd_keyset::push(&ctx, &file.file, force, chunk_keys as usize),
        Command::Key(KeyCmd::Create(a)) => cmd_key::create(
            &ctx,
            &a.file.file,
            a.push.push,
            cmd_key::NewKey {
                consumer: a.consumer,
                plan: a.plan,
                expires: a.expiry.expires,
                ttl: a.expiry.ttl,
                not_before: a.not_before,
                scopes: a.scope,
                cidrs: a.cidr,
                meta: a.meta,
            },
        ),
        Command::Key(KeyCmd::Revoke(a)) => cmd_key::revoke(&ctx, &args::key_id(&a.id)?, &a.file.file, a.push.push),
        Command::Key(KeyCmd::Disable(a)) => {
            cmd_key::set_enabled(&ctx, &args::key_id(&a.id)?, false, &a.file.file, a.push.push)
        }
        Command::Key(KeyCmd::Enable(a)) => {
            cmd_key::set_enabled(&ctx, &args::key_id(&a.id)?, true, &a.file.file, a.push.push)
        }
        Command::Key(KeyCmd::Rotate { key, overlap, expiry }) => cmd_key::rotate(
            &ctx,
            &args::key_id(&key.id)?,
            overlap,
            expiry.expires,
            expiry.ttl,
            &key.file.file,
            key.push.push,
        ),
        Command::Key(KeyCmd::SetPlan { key, plan }) => {
            cmd_key::set_plan(&ctx, &args::key_id(&key.id)?, &plan, &key.file.file, key.push.push)
        }
        Command::Key(KeyCmd::List { file }) => cmd_key::list(&ctx, &file.file),
        Command::Status => cmd_keyset::status(&ctx),
        Command::Usage(a) => {
            let format = match (ctx.out.json, a.format) {
                (true, None | Some(usage::Format::Json)) => usage::Format::Json,
                (true, Some(_)) => return Err(usage("--json conflicts with --format csv/table")),
                (false, f) => f.unwrap_or(usage::Format::Table),
            };
            let ctx = Ctx {
                out: Output {
                    json: format == usage::Format::Json,
                },
                ..ctx
            };
            usage::run(
                &ctx,
                usage::Options {
                    consumer: a.consumer.as_deref(),
                    format,
                    by: a.by,
                    since_file: a.since_file.as_deref(),
                },
            )
        }
    }
}

/// clap keeps only the subcommand's values of a global option given on both sides of it
/// (`--admin A usage --admin B`); refuse that rather than silently dropping an Envoy.
fn check_admin_placement(argv: &[std::ffi::OsString], cli: &Cli) -> Result<()> {
    let given = argv
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy())
        .take_while(|a| a != "--")
        .filter(|a| *a == "--admin" || a.starts_with("--admin="))
        .count();
    if given > cli.global.admin.len() {
        return Err(usage(
            "give every --admin on the same side of the subcommand (e.g. all after `usage`)",
        ));
    }
    Ok(())
}

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit(); // help/version: stdout, exit 0; help for a missing subcommand: stderr, exit 2
            }
            let text = e.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            output::error(text.trim_end());
            std::process::exit(2);
        }
    };
    if let Err(e) = check_admin_placement(&argv, &cli).and_then(|()| run(cli)) {
        output::error(&e.to_string());
        std::process::exit(e.code());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(argv: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keymeter").chain(argv.iter().copied()))
    }

    #[test]
    fn parses_repeated_scopes_and_meta() {
        let cli = parse(&[
            "key",
            "create",
            "--consumer",
            "acme",
            "--plan",
            "free",
            "--scope",
            "GET,HEAD:/v1/reports",
            "--scope",
            "/v2",
            "--meta",
            "tier=gold",
            "--meta",
            "region=eu",
            "--ttl",
            "30d",
            "--json",
        ])
        .unwrap();
        assert!(cli.global.json);
        let Command::Key(KeyCmd::Create(a)) = cli.command else {
            panic!()
        };
        assert_eq!(a.scope.len(), 2);
        assert_eq!(a.scope[0].methods, ["GET", "HEAD"]);
        assert_eq!(a.scope[1].path_prefix, "/v2");
        assert_eq!(
            a.meta,
            [
                ("tier".to_string(), "gold".to_string()),
                ("region".to_string(), "eu".to_string())
            ]
        );
        assert_eq!(a.expiry.ttl, Some(30 * 86_400));
        assert_eq!(a.file.file, PathBuf::from("keyset.json"));
    }

    #[test]
    fn usage_errors() {
        use clap::error::ErrorKind;
        let kind = |argv: &[&str]| parse(argv).err().map(|e| e.kind());
        assert_eq!(
            kind(&["key", "create", "--consumer", "a", "--plan", "p", "--scope", "x"]),
            Some(ErrorKind::ValueValidation)
        );
        assert_eq!(
            kind(&["key", "create", "--consumer", "a", "--plan", "p", "--meta", "x"]),
            Some(ErrorKind::ValueValidation)
        );
        assert_eq!(
            kind(&[
                "key",
                "create",
                "--consumer",
                "a",
                "--plan",
                "p",
                "--ttl",
                "1d",
                "--expires",
                "2030-01-01T00:00:00Z"
            ]),
            Some(ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            kind(&["key", "rotate", "AbCdEf012345"]),
            Some(ErrorKind::MissingRequiredArgument)
        );
        assert_eq!(
            kind(&["key", "create", "--plan", "p"]),
            Some(ErrorKind::MissingRequiredArgument)
        );
        assert!(parse(&["--admin", "http://h:1", "status"]).is_ok());
        assert!(parse(&["status", "--token", "t"]).is_ok());
        assert_eq!(
            kind(&["usage", "--format", "xml", "--admin", "http://h:1"]),
            Some(ErrorKind::InvalidValue)
        );
        assert_eq!(kind(&["usage", "--by", "lineage"]), Some(ErrorKind::InvalidValue));
    }

    #[test]
    fn usage_takes_several_admins() {
        let split = ["keymeter", "--admin", "http://a:1", "usage", "--admin", "http://b:2"];
        let argv: Vec<std::ffi::OsString> = split.iter().map(Into::into).collect();
        let cli = parse(&split[1..]).unwrap();
        assert!(check_admin_placement(&argv, &cli).is_err(), "clap dropped one");
        let cli = parse(&[
            "usage",
            "--admin",
            "http://a:1",
            "--admin",
            "http://b:2",
            "--by",
            "plan",
            "--format",
            "csv",
            "--since-file",
            "s.json",
        ])
        .unwrap();
        assert_eq!(cli.global.admin, ["http://a:1", "http://b:2"]);
        let Command::Usage(a) = cli.command else { panic!() };
        assert_eq!((a.by, a.format), (usage::By::Plan, Some(usage::Format::Csv)));
        assert_eq!(a.since_file, Some(PathBuf::from("s.json")));
        let ctx = Ctx {
            out: Output { json: false },
            admin_urls: cli.global.admin,
            token: None,
        };
        assert_eq!(ctx.admins("usage").unwrap().len(), 2);
        assert!(matches!(ctx.admin("status"), Err(error::Fail::Usage(m)) if m.contains("one --admin")));
    }
}
