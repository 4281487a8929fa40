//! The administrator's API on a root-only Unix socket.
//!
//! The socket file is created mode 0600 in a directory the daemon owns, and every
//! connection is checked with `SO_PEERCRED`: only root (or the daemon's own user, for a
//! daemon run unprivileged in development) may connect.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use capnet_driver_api::Limits as GrantLimits;
use capnet_driver_api::policy::RuleConfig;
use capnet_schemas::admin_capnp::{admin, grain_info, powerbox_request, sandbox_limits};
use capnet_schemas::rpc::two_party;
use capnp::Error;
use capnp_rpc::rpc_twoparty_capnp::Side;
use tokio::net::UnixListener;
use tokio::sync::Notify;

use crate::audit::{Audit, AuditRecord};
use crate::config::SharedConfig;
use crate::config::{LimitOverrides, SandboxLimits};
use crate::drivers::DriverManager;
use crate::drivers::Inspection;
use crate::grains::{GrainInfo, GrainManager, GrainState, StartSpec};
use crate::grants::{GrantKind, GrantTable, NewGrant};
use crate::powerbox::{Answer, Powerbox, RequestInfo, describe};
use crate::state::AuditFilter;
use capnet_schemas::admin_capnp::plugin_info;

/// Binding the admin socket failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    /// Another daemon answers on the socket.
    #[error("another capnetd is already listening on {0}; stop it or choose another admin_socket")]
    InUse(PathBuf),
    /// Creating or binding failed.
    #[error("cannot create the admin socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Binds the admin socket (mode 0600), replacing a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, AdminSocketError> {
    use std::os::unix::fs::PermissionsExt;
    let bind_err = |source| AdminSocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AdminSocketError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    // Permissions are tightened right after bind; every connection's peer credentials are
    // checked as well, so the moment in between grants nothing.
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Accepts administrators until the listener fails.
pub async fn serve(listener: UnixListener, admin: admin::Client) {
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 || c.uid() == me => {}
            Ok(c) => {
                tracing::warn!(
                    uid = c.uid(),
                    "refused an admin connection from a non-root user"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read admin peer credentials");
                continue;
            }
        }
        let rpc = two_party(stream, Side::Server, Some(admin.clone().client));
        tokio::task::spawn_local(async move {
            let _ = rpc.await;
        });
    }
}

/// The `Admin` capability.
pub struct AdminImpl {
    /// Grains.
    pub grains: GrainManager,
    /// Drivers.
    pub drivers: DriverManager,
    /// Grants.
    pub grants: GrantTable,
    /// Pending requests.
    pub powerbox: Powerbox,
    /// The configuration in force.
    pub config: SharedConfig,
    /// Audit trail.
    pub audit: Audit,
    /// Default stop grace period.
    pub stop_grace: Duration,
    /// Notified when an administrator asks the daemon to shut down.
    pub shutdown: Rc<Notify>,
}

fn absolute(path: &str) -> Result<std::path::PathBuf, Error> {
    let p = std::path::PathBuf::from(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(Error::failed(format!(
            "{path:?} is not an absolute path (the CLI sends absolute paths)"
        )))
    }
}

fn write_plugin(mut b: plugin_info::Builder<'_>, i: &Inspection) {
    b.set_path(i.path.display().to_string());
    b.set_size(i.size);
    b.set_sha256(&i.sha256);
    b.set_name(&i.identity.name);
    b.set_version(&i.identity.version);
    b.set_abi_major(i.identity.abi_major);
    b.set_abi_minor(i.identity.abi_minor);
    b.set_signature(i.signature.describe());
    b.set_signer_key(i.signature.key().unwrap_or(""));
    i.identity.manifest.write(b.init_manifest());
}

impl AdminImpl {
    /// Re-reads the config and applies it (after an edit of the config file, or on request).
    async fn apply_config(&self) -> Result<String, Error> {
        crate::daemon::reload(&self.config, &self.drivers, &self.grants, &self.audit)
            .await
            .map_err(Error::failed)
    }

    /// Pins the inspected plugin `i` at `path` as driver `name` in the config, audits it as
    /// `kind` and applies the config.
    async fn pin_plugin(
        &self,
        kind: &str,
        name: &str,
        path: &Path,
        sha: &str,
        i: &Inspection,
    ) -> Result<(), Error> {
        crate::config_edit::approve(
            &self.config.get().path,
            name,
            path,
            sha,
            &i.identity.manifest.privileges,
            i.signature.key(),
        )
        .map_err(err)?;
        self.audit
            .record(AuditRecord::new(kind).driver(name).detail(format!(
                "{} {} v{} sha256 {sha}, privileges [{}]",
                path.display(),
                i.identity.name,
                i.identity.version,
                i.identity.manifest.privileges.names().join(", ")
            )));
        self.apply_config().await.map(drop)
    }

    /// Inspects `path` and fails unless its SHA-256 is `sha` (what the administrator saw).
    async fn inspect_expecting(
        &self,
        path: &std::path::Path,
        sha: &str,
    ) -> Result<Inspection, Error> {
        let trusted = self.config.get().trust.authors.clone();
        let i = self
            .drivers
            .inspect(path, &trusted)
            .await
            .map_err(Error::failed)?;
        if let crate::signing::SignatureStatus::Invalid(why) = &i.signature {
            return Err(Error::failed(format!(
                "{}: its signature file {} does not verify ({why}); remove the signature or get \
                 a correctly signed plugin",
                path.display(),
                crate::signing::sig_path(path).display()
            )));
        }
        if sha.is_empty() {
            return Err(Error::failed(
                "give the SHA-256 shown by `capnet driver inspect` (the CLI does)".to_string(),
            ));
        }
        if i.sha256 != sha {
            return Err(Error::failed(format!(
                "{} changed since it was inspected: SHA-256 is now {}, not {sha}; inspect it again",
                path.display(),
                i.sha256
            )));
        }
        Ok(i)
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::failed(e.to_string())
}

fn write_grain(mut b: grain_info::Builder<'_>, g: &GrainInfo) {
    b.set_id(&g.id);
    b.set_state(match g.state {
        GrainState::Starting => grain_info::State::Starting,
        GrainState::Running => grain_info::State::Running,
        GrainState::Stopping => grain_info::State::Stopping,
        GrainState::Exited => grain_info::State::Exited,
    });
    b.set_pid(g.pid);
    b.set_started_at_ms(g.started_ms);
    b.set_exit_status(g.exit_status);
    b.set_exit_reason(&g.exit_reason);
    let mut c = b.reborrow().init_command(g.command.len() as u32);
    for (i, a) in g.command.iter().enumerate() {
        c.set(i as u32, a);
    }
    write_limits(b.reborrow().init_limits(), &g.limits);
    if let Some(s) = &g.usage {
        let mut u = b.reborrow().init_usage();
        u.set_valid(true);
        u.set_memory_bytes(s.memory_bytes);
        u.set_pids(s.pids);
        u.set_cpu_usage_ns(s.cpu_usage_ns);
        u.set_oom_kills(s.oom_kills);
        u.set_pids_limit_hits(s.pids_max_hits);
    }
    b.set_uptime_ms(u64::try_from(g.uptime.as_millis()).unwrap_or(u64::MAX));
    b.set_exit_cause(g.exit_cause);
    b.set_oom_killed(g.oom_killed);
    b.set_pids_limit_hit(g.pids_limit_hit);
    b.set_host_uid(g.host_uid);
}

fn write_limits(mut b: sandbox_limits::Builder<'_>, l: &SandboxLimits) {
    b.set_memory_bytes(l.memory_bytes);
    b.set_pids(l.pids);
    b.set_cpu_millis(l.cpu_millis);
    b.set_tmp_bytes(l.tmp_bytes);
    b.set_nofile(l.nofile);
    b.set_fsize_bytes(l.fsize_bytes);
}

/// Limits of a start request: zero fields keep the configured values.
fn read_overrides(r: sandbox_limits::Reader<'_>) -> LimitOverrides {
    let some = |v: u64| (v != 0).then_some(v);
    LimitOverrides {
        memory_bytes: some(r.get_memory_bytes()),
        pids: some(r.get_pids()),
        cpu_millis: some(r.get_cpu_millis()),
        tmp_bytes: some(r.get_tmp_bytes()),
        nofile: some(r.get_nofile()),
        fsize_bytes: some(r.get_fsize_bytes()),
    }
}

fn write_request(mut b: powerbox_request::Builder<'_>, r: &RequestInfo) {
    b.set_id(r.id);
    b.set_grain_id(&r.grain);
    b.set_interface_id(r.requested.interface_id());
    b.set_interface_name(r.requested.interface_name());
    b.set_label(&r.label);
    b.set_age_ms(r.age.as_millis() as u64);
    b.set_preferred_host(r.requested.host().unwrap_or(""));
    b.set_preferred_port(r.requested.port().unwrap_or(0));
    if let capnet_schemas::descriptor::Requested::IpNetwork { encryption } = &r.requested {
        b.set_encryption(encryption.to_string());
    }
}

impl admin::Server for AdminImpl {
    async fn start_grain(
        self: Rc<Self>,
        params: admin::StartGrainParams,
        mut results: admin::StartGrainResults,
    ) -> Result<(), Error> {
        let spec = params.get()?.get_spec()?;
        let name = spec.get_name()?.to_str()?;
        let id = spec.get_id()?.to_str()?;
        let mut command = Vec::new();
        for a in spec.get_command()? {
            command.push(a?.to_string()?);
        }
        let mut env = Vec::new();
        for kv in spec.get_env()? {
            env.push((kv.get_key()?.to_string()?, kv.get_value()?.to_string()?));
        }
        let limits = read_overrides(spec.get_limits()?);
        let info = self
            .grains
            .start(StartSpec {
                name: (!name.is_empty()).then(|| name.to_string()),
                id: (!id.is_empty()).then(|| id.to_string()),
                command,
                env,
                limits,
            })
            .await
            .map_err(err)?;
        write_grain(results.get().init_grain(), &info);
        Ok(())
    }

    async fn stop_grain(
        self: Rc<Self>,
        params: admin::StopGrainParams,
        mut results: admin::StopGrainResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let id = p.get_grain_id()?.to_str()?.to_string();
        let grace = match p.get_grace_ms() {
            0 => self.stop_grace,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let info = self.grains.stop(&id, grace).await.map_err(err)?;
        write_grain(results.get().init_grain(), &info);
        Ok(())
    }

    async fn list_grains(
        self: Rc<Self>,
        _: admin::ListGrainsParams,
        mut results: admin::ListGrainsResults,
    ) -> Result<(), Error> {
        let list = self.grains.list();
        let mut l = results.get().init_grains(list.len() as u32);
        for (i, g) in list.iter().enumerate() {
            write_grain(l.reborrow().get(i as u32), g);
        }
        Ok(())
    }

    async fn grain_status(
        self: Rc<Self>,
        params: admin::GrainStatusParams,
        mut results: admin::GrainStatusResults,
    ) -> Result<(), Error> {
        let id = params.get()?.get_grain_id()?.to_str()?;
        let info = self.grains.status(id).map_err(err)?;
        write_grain(results.get().init_grain(), &info);
        Ok(())
    }

    async fn grain_logs(
        self: Rc<Self>,
        params: admin::GrainLogsParams,
        mut results: admin::GrainLogsResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let id = p.get_grain_id()?.to_str()?;
        let max = match p.get_max_bytes() {
            0 => 64 * 1024,
            n => n.min(16 << 20),
        };
        let log = self.grains.logs(id, max).map_err(err)?;
        results.get().set_log(&log);
        Ok(())
    }

    async fn list_requests(
        self: Rc<Self>,
        _: admin::ListRequestsParams,
        mut results: admin::ListRequestsResults,
    ) -> Result<(), Error> {
        let list = self.powerbox.list();
        let mut l = results.get().init_requests(list.len() as u32);
        for (i, r) in list.iter().enumerate() {
            write_request(l.reborrow().get(i as u32), r);
        }
        Ok(())
    }

    async fn grant(
        self: Rc<Self>,
        params: admin::GrantParams,
        mut results: admin::GrantResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let request_id = p.get_request_id();
        let driver = p.get_driver()?.to_str()?.to_string();
        let c = p.get_constraints()?;
        if !self.drivers.exists(&driver) {
            return Err(Error::failed(format!(
                "no driver named {driver:?} is configured; see `capnet driver list`"
            )));
        }
        let mut rules = Vec::new();
        for r in c.get_rules()? {
            rules.push(RuleConfig::read_capnp(r).map_err(err)?);
        }
        let limits = GrantLimits::read_capnp(c.get_limits()?);
        let host = c.get_host()?.to_str()?;
        let port = c.get_port();
        let pending = self
            .powerbox
            .list()
            .into_iter()
            .find(|r| r.id == request_id)
            .ok_or_else(|| {
                Error::failed(format!(
                    "no pending request {request_id}; see `capnet powerbox list`"
                ))
            })?;
        let kind = GrantKind::for_request(
            &pending.requested,
            (!host.is_empty()).then_some(host),
            (port != 0).then_some(port),
        )
        .map_err(Error::failed)?;
        let taken = self
            .powerbox
            .take(request_id)
            .ok_or_else(|| Error::failed(format!("request {request_id} is no longer pending")))?;
        let detail = format!(
            "request {request_id}: {} (asked for {})",
            kind.describe(),
            describe(&pending.requested)
        );
        let grant = self
            .grants
            .create(
                NewGrant {
                    grain: taken.info.grain.clone(),
                    driver: driver.clone(),
                    kind,
                    label: taken.info.label.clone(),
                    rules,
                    limits,
                    source: "admin".into(),
                },
                detail,
            )
            .await
            .map_err(err)?;
        let id = grant.id.clone();
        if taken.answer(Answer::Granted(grant)).is_err() {
            let _ = self
                .grants
                .revoke(&id, "the grain stopped waiting for the request")
                .await;
            return Err(Error::failed(format!(
                "grain {} stopped waiting for request {request_id}",
                pending.grain
            )));
        }
        results.get().set_grant_id(&id);
        Ok(())
    }

    async fn deny(
        self: Rc<Self>,
        params: admin::DenyParams,
        _: admin::DenyResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let id = p.get_request_id();
        let reason = p.get_reason()?.to_str()?.to_string();
        let taken = self.powerbox.take(id).ok_or_else(|| {
            Error::failed(format!(
                "no pending request {id}; see `capnet powerbox list`"
            ))
        })?;
        let grain = taken.info.grain.clone();
        let what = describe(&taken.info.requested);
        let _ = taken.answer(Answer::Denied(reason.clone()));
        self.audit.record(
            AuditRecord::new("deny")
                .grain(&grain)
                .detail(format!("request {id}: {what}: {reason}")),
        );
        Ok(())
    }

    async fn list_drivers(
        self: Rc<Self>,
        _: admin::ListDriversParams,
        mut results: admin::ListDriversResults,
    ) -> Result<(), Error> {
        let list = self.drivers.list();
        let grants = self.grants.list();
        let mut l = results.get().init_drivers(list.len() as u32);
        for (i, d) in list.iter().enumerate() {
            let mut b = l.reborrow().get(i as u32);
            b.set_name(&d.name);
            b.set_state(d.state);
            b.set_pid(d.pid);
            b.set_plugin(d.plugin.to_string_lossy().as_ref());
            b.set_version(&d.version);
            b.set_restarts(d.restarts);
            b.set_uptime_ms(d.uptime.as_millis() as u64);
            b.set_last_error(&d.last_error);
            let mine = grants
                .iter()
                .filter(|g| g.driver == d.name && !g.is_revoked());
            let (n, open) = mine.fold((0u32, 0u32), |(n, o), g| {
                (n + 1, o + g.open_connections.get())
            });
            b.set_grants(n);
            b.set_open_connections(open);
        }
        Ok(())
    }

    async fn wait_for_request(
        self: Rc<Self>,
        params: admin::WaitForRequestParams,
        mut results: admin::WaitForRequestResults,
    ) -> Result<(), Error> {
        let ms = params.get()?.get_timeout_ms();
        match self
            .powerbox
            .wait(Duration::from_millis(u64::from(ms)))
            .await
        {
            Some(r) => {
                let mut res = results.get();
                res.set_found(true);
                write_request(res.init_request(), &r);
            }
            None => results.get().set_found(false),
        }
        Ok(())
    }

    async fn wait_grain(
        self: Rc<Self>,
        params: admin::WaitGrainParams,
        mut results: admin::WaitGrainResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let id = p.get_grain_id()?.to_str()?.to_string();
        let timeout = Duration::from_millis(u64::from(p.get_timeout_ms()));
        let (info, exited) = self.grains.wait(&id, timeout).await.map_err(err)?;
        let mut r = results.get();
        r.set_exited(exited);
        write_grain(r.init_grain(), &info);
        Ok(())
    }

    async fn list_grants(
        self: Rc<Self>,
        params: admin::ListGrantsParams,
        mut results: admin::ListGrantsResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let grain = p.get_grain()?.to_str()?;
        let driver = p.get_driver()?.to_str()?;
        let list = self
            .grants
            .listing(
                (!grain.is_empty()).then_some(grain),
                (!driver.is_empty()).then_some(driver),
            )
            .await
            .map_err(err)?;
        let mut l = results.get().init_grants(list.len() as u32);
        for (i, g) in list.iter().enumerate() {
            let mut b = l.reborrow().get(i as u32);
            let r = &g.row;
            b.set_id(&r.id);
            b.set_grain(&r.grain);
            b.set_driver(&r.driver);
            b.set_kind(
                GrantKind::from_json(&r.kind)
                    .map(|k| k.describe())
                    .unwrap_or_else(|e| format!("(unreadable: {e})")),
            );
            b.set_constraints(format!("{{\"rules\":{},\"limits\":{}}}", r.rules, r.limits));
            b.set_label(&r.label);
            b.set_source(&r.source);
            b.set_created_ms(r.created_ms);
            b.set_last_used_ms(r.last_used_ms);
            b.set_bytes_in(r.bytes_in);
            b.set_bytes_out(r.bytes_out);
            b.set_open_connections(g.open_connections);
            b.set_revoked_ms(r.revoked_ms.unwrap_or(0));
            b.set_revoke_reason(r.revoke_reason.as_deref().unwrap_or(""));
        }
        Ok(())
    }

    async fn revoke_grant(
        self: Rc<Self>,
        params: admin::RevokeGrantParams,
        mut results: admin::RevokeGrantResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let id = p.get_grant_id()?.to_str()?.to_string();
        let reason = match p.get_reason()?.to_str()? {
            "" => "revoked by the administrator".to_string(),
            r => r.to_string(),
        };
        let was_live = self.grants.revoke(&id, &reason).await.map_err(err)?;
        if !was_live {
            let known = self
                .grants
                .listing(None, None)
                .await
                .map_err(err)?
                .into_iter()
                .any(|g| g.row.id == id);
            if !known {
                return Err(Error::failed(format!(
                    "no grant {id}; see `capnet grants list`"
                )));
            }
        }
        results.get().set_was_live(was_live);
        Ok(())
    }

    async fn audit(
        self: Rc<Self>,
        params: admin::AuditParams,
        mut results: admin::AuditResults,
    ) -> Result<(), Error> {
        let f = params.get()?.get_filter()?;
        let text = |t: &str| (!t.is_empty()).then(|| t.to_string());
        let filter = AuditFilter {
            grain: text(f.get_grain()?.to_str()?),
            grant: text(f.get_grant()?.to_str()?),
            kind: text(f.get_kind()?.to_str()?),
            since_ms: (f.get_since_ms() != 0).then(|| f.get_since_ms()),
            limit: match f.get_limit() {
                0 => 1000,
                n => n as usize,
            },
        };
        // Records batched in memory reach the database before this query does.
        self.audit.flush();
        let records = self
            .grants
            .state()
            .call(move |db| db.audit(&filter))
            .await
            .map_err(err)?;
        let mut l = results.get().init_records(records.len() as u32);
        for (i, r) in records.iter().enumerate() {
            let mut b = l.reborrow().get(i as u32);
            b.set_time_ms(r.time_ms);
            b.set_kind(&r.kind);
            b.set_grain(&r.grain);
            b.set_grant(&r.grant);
            b.set_driver(&r.driver);
            b.set_destination(&r.destination);
            b.set_rule(&r.rule);
            b.set_bytes_in(r.bytes_in);
            b.set_bytes_out(r.bytes_out);
            b.set_duration_ms(r.duration_ms);
            b.set_detail(&r.detail);
        }
        Ok(())
    }

    async fn delete_grain(
        self: Rc<Self>,
        params: admin::DeleteGrainParams,
        mut results: admin::DeleteGrainResults,
    ) -> Result<(), Error> {
        let id = params.get()?.get_grain_id()?.to_str()?.to_string();
        let (grants, tokens) = self
            .grains
            .delete(&id, self.stop_grace)
            .await
            .map_err(err)?;
        let mut r = results.get();
        r.set_grants(grants as u32);
        r.set_tokens(tokens as u32);
        Ok(())
    }

    async fn inspect_driver(
        self: Rc<Self>,
        params: admin::InspectDriverParams,
        mut results: admin::InspectDriverResults,
    ) -> Result<(), Error> {
        let path = absolute(params.get()?.get_path()?.to_str()?)?;
        let trusted = self.config.get().trust.authors.clone();
        let i = self
            .drivers
            .inspect(&path, &trusted)
            .await
            .map_err(Error::failed)?;
        write_plugin(results.get().init_plugin(), &i);
        Ok(())
    }

    async fn approve_driver(
        self: Rc<Self>,
        params: admin::ApproveDriverParams,
        mut results: admin::ApproveDriverResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let path = absolute(p.get_path()?.to_str()?)?;
        let sha = p.get_sha256()?.to_str()?.to_ascii_lowercase();
        let i = self.inspect_expecting(&path, &sha).await?;
        let name = match p.get_name()?.to_str()? {
            "" => i.identity.name.clone(),
            n => n.to_string(),
        };
        let config = self.config.get();
        if let Some(d) = config.drivers.get(&name)
            && d.sha256.is_some()
        {
            return Err(Error::failed(format!(
                "driver {name} is already approved; use `capnet driver upgrade {name} {}` to \
                 replace its plugin",
                path.display()
            )));
        }
        self.pin_plugin("driver_approved", &name, &path, &sha, &i)
            .await?;
        write_plugin(results.get().init_plugin(), &i);
        Ok(())
    }

    async fn revoke_driver(
        self: Rc<Self>,
        params: admin::RevokeDriverParams,
        mut results: admin::RevokeDriverResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_str()?.to_string();
        let reason = match p.get_reason()?.to_str()? {
            "" => "the administrator revoked the driver's approval".to_string(),
            r => r.to_string(),
        };
        let config = self.config.get();
        if !config.drivers.contains_key(&name) {
            return Err(Error::failed(format!(
                "no driver {name} in the config; see `capnet driver list`"
            )));
        }
        // Checked first, so a config that would not load without the driver refuses the
        // revocation before any grant is touched.
        let removal = crate::config_edit::driver_removal(&config.path, &name).map_err(|e| {
            Error::failed(format!(
                "driver {name} was not revoked, nothing changed: the config would not be valid \
                 without it ({e}); remove or change what still names it (such as \
                 [[powerbox.rules]]) first"
            ))
        })?;
        let live = self
            .grants
            .list()
            .into_iter()
            .filter(|g| g.driver == name)
            .count();
        self.grants
            .revoke_driver(&name, &reason)
            .await
            .map_err(err)?;
        removal.write().map_err(err)?;
        self.audit.record(
            AuditRecord::new("driver_revoked")
                .driver(&name)
                .detail(reason),
        );
        self.apply_config().await?;
        results.get().set_grants_revoked(live as u32);
        Ok(())
    }

    async fn upgrade_driver(
        self: Rc<Self>,
        params: admin::UpgradeDriverParams,
        mut results: admin::UpgradeDriverResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_str()?.to_string();
        let path = absolute(p.get_path()?.to_str()?)?;
        let sha = p.get_sha256()?.to_str()?.to_ascii_lowercase();
        let config = self.config.get();
        if !config.drivers.contains_key(&name) {
            return Err(Error::failed(format!(
                "no driver {name} to upgrade; approve it with `capnet driver approve {} --name {name}`",
                path.display()
            )));
        }
        let i = self.inspect_expecting(&path, &sha).await?;
        self.pin_plugin("driver_upgraded", &name, &path, &sha, &i)
            .await?;
        write_plugin(results.get().init_plugin(), &i);
        Ok(())
    }

    async fn driver_approval(
        self: Rc<Self>,
        params: admin::DriverApprovalParams,
        mut results: admin::DriverApprovalResults,
    ) -> Result<(), Error> {
        let name = params.get()?.get_name()?.to_str()?.to_string();
        let config = self.config.get();
        let Some(d) = config.drivers.get(&name) else {
            return Err(Error::failed(format!("no driver {name} in the config")));
        };
        let mut r = results.get();
        r.set_sha256(d.sha256.as_deref().unwrap_or(""));
        r.set_signer_key(d.signer_key.as_deref().unwrap_or(""));
        r.set_plugin(config.plugin_path(d).display().to_string());
        d.privileges
            .unwrap_or_default()
            .write(r.reborrow().init_privileges());
        if let Some((_, _, Some(id))) = self.drivers.approval(&name) {
            r.set_is_running(true);
            let mut b = r.init_running();
            b.set_name(&id.name);
            b.set_version(&id.version);
            b.set_abi_major(id.abi_major);
            b.set_abi_minor(id.abi_minor);
            id.manifest.write(b.init_manifest());
        }
        Ok(())
    }

    async fn reload(
        self: Rc<Self>,
        _: admin::ReloadParams,
        mut results: admin::ReloadResults,
    ) -> Result<(), Error> {
        let summary = self.apply_config().await?;
        results.get().set_summary(summary);
        Ok(())
    }

    async fn shutdown(
        self: Rc<Self>,
        _: admin::ShutdownParams,
        _: admin::ShutdownResults,
    ) -> Result<(), Error> {
        self.audit.record(AuditRecord::new("shutdown_requested"));
        self.shutdown.notify_one();
        Ok(())
    }
}
