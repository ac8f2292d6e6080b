// conexa-backup status page: sign in with the API's token (kept in sessionStorage, never in
// a cookie or a URL), show the facts the server renders (GET /api/admin/page), and run the
// admin actions through the same API the admin panel uses. The server checks every role
// again; this script only hides what a role cannot use. No library, no build step.
"use strict";
(() => {
  const KEY = "conexa-backup-token";
  const POLL_MS = 1000;
  const words = JSON.parse(document.getElementById("words").textContent);
  const lang = document.documentElement.lang;
  const $ = (id) => document.getElementById(id);
  const view = $("view"), note = $("note"), signin = $("signin"), jobBox = $("job");
  let days = 30;
  let following = null; // the job id being followed

  const fill = (text, values) => text.replace(/\{(\w+)\}/g, (_, k) => String(values[k] ?? ""));
  const say = (text, bad) => { note.textContent = text; note.className = bad ? "note bad" : "note"; };
  const token = () => sessionStorage.getItem(KEY);

  class Refused extends Error {}

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + token() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const answer = await fetch(path, {
      method, headers, cache: "no-store", credentials: "omit",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (answer.status === 401) { signOut(words.expired); throw new Refused(words.expired); }
    return answer;
  }

  async function why(answer) {
    try { const data = await answer.json(); return data.message || data.error; }
    catch { return `${answer.status} ${answer.statusText}`; }
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    view.replaceChildren();
    jobBox.hidden = true;
    $("signout").hidden = true;
    signin.hidden = false;
    say(message || "", Boolean(message));
    $("token").focus();
  }

  // focusDays: after the period changed, the keyboard's focus goes back to its button (the
  // buttons are drawn anew, and focus would otherwise fall back to the page's top).
  async function load(focusDays) {
    signin.hidden = true;
    view.setAttribute("aria-busy", "true");
    try {
      const answer = await api("GET", `/api/admin/page?days=${days}&lang=${lang}`);
      if (!answer.ok) { say(await why(answer), true); return; }
      // Server-rendered, every value escaped there (conexa_backup/statuspage.py).
      view.innerHTML = await answer.text();
      $("signout").hidden = false;
      if (focusDays) view.querySelector(`[data-days="${focusDays}"]`)?.focus();
      const running = $("running");
      if (running && running.dataset.job && !following && canFollow()) follow(running.dataset.job);
    } catch (e) {
      if (!(e instanceof Refused)) say(String(e), true);
    } finally {
      view.setAttribute("aria-busy", "false");
    }
  }

  // Only an admin may read jobs; the server renders action buttons for admins only.
  const canFollow = () => view.querySelector("[data-action=trigger]") !== null;

  function confirmTyped(id, question, action) {
    const dialog = $("confirm"), input = $("confirm-id"), ok = $("confirm-ok");
    $("confirm-text").textContent = fill(question, { id });
    $("confirm-label").textContent = fill(words.type_id, { id });
    ok.textContent = action;
    input.value = "";
    ok.disabled = true;
    input.oninput = () => { ok.disabled = input.value.trim() !== id; };
    $("confirm-cancel").onclick = () => dialog.close("cancel");
    return new Promise((resolve) => {
      dialog.onclose = () => resolve(dialog.returnValue === "ok" && input.value.trim() === id);
      dialog.returnValue = "";
      dialog.showModal();
      input.focus();
    });
  }

  function showJob(job) {
    const kind = job.kind === "restore" ? words.restore : words.backup;
    const state = words[job.state === "failed" ? "failed_state" : job.state] || job.state;
    const head = document.createElement("p");
    head.textContent = fill(words.job, { kind, id: job.backup_id || "", state });
    const parts = [head];
    if (job.state === "queued" || job.state === "running") {
      const bar = document.createElement("progress");
      bar.setAttribute("aria-label", head.textContent);
      parts.push(bar);
    }
    const step = (job.steps || []).at(-1);
    if (step) { const p = document.createElement("p"); p.textContent = step; parts.push(p); }
    if (job.error) {
      const p = document.createElement("p");
      p.className = "bad";
      p.textContent = fill(words.failed, { why: job.error });
      parts.push(p);
    }
    jobBox.replaceChildren(...parts);
    jobBox.dataset.state = job.state;
    jobBox.hidden = false;
  }

  async function follow(jobId) {
    following = jobId;
    try {
      for (;;) {
        const answer = await api("GET", `/api/admin/jobs/${encodeURIComponent(jobId)}`);
        if (!answer.ok) { say(await why(answer), true); return; }
        const job = await answer.json();
        showJob(job);
        if (job.state !== "queued" && job.state !== "running") break;
        await new Promise((r) => setTimeout(r, POLL_MS));
      }
      await load();
    } catch (e) {
      if (!(e instanceof Refused)) say(String(e), true);
    } finally {
      following = null;
    }
  }

  async function restore(id, label) {
    if (!(await confirmTyped(id, words.confirm_restore, label))) return;
    const answer = await api("POST", `/api/admin/backups/${encodeURIComponent(id)}/restore`,
      { confirm: id });
    if (!answer.ok) { say(await why(answer), true); return; }
    const started = await answer.json();
    say(started.message || "", false);
    showJob(started.job);
    await follow(started.jobId);
  }

  async function remove(id, label) {
    if (!(await confirmTyped(id, words.confirm_delete, label))) return;
    const answer = await api("DELETE", `/api/admin/backups/${encodeURIComponent(id)}`);
    if (!answer.ok) { say(await why(answer), true); return; }
    const done = await answer.json();
    say(fill(words.deleted, { id, targets: (done.deleted || []).join(", ") }), false);
    await load();
  }

  async function trigger() {
    const answer = await api("POST", "/api/admin/backups/trigger");
    if (!answer.ok) { say(await why(answer), true); return; }
    const started = await answer.json();
    showJob(started.job);
    await follow(started.jobId);
  }

  async function fetchFile(url, name) {
    say(fill(words.downloading, { name }), false);
    const answer = await api("GET", url);
    if (!answer.ok) { say(await why(answer), true); return; }
    // The file passes through the browser's memory: the API's bearer token cannot ride on
    // a plain link (never in a URL). `conexa-backup download` streams large ones to disk.
    const blob = await answer.blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    say(fill(words.downloaded, { name }), false);
  }

  async function download(id) {
    const answer = await api("GET", `/api/admin/backups/${encodeURIComponent(id)}/download`);
    if (!answer.ok) { say(await why(answer), true); return; }
    const listed = await answer.json();
    const items = listed.artifacts.map((a) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      const size = a.size == null ? "" : ` (${(a.size / 1e6).toFixed(1)} MB)`;
      button.textContent = `${a.name}${size}`;
      button.onclick = () => fetchFile(a.url, `${id}-${a.name}`).catch((e) => {
        if (!(e instanceof Refused)) say(String(e), true);
      });
      item.append(button);
      return item;
    });
    $("files-title").textContent = fill(words.files, { id });
    $("files-list").replaceChildren(...items);
    $("files").showModal();
  }

  view.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const id = button.dataset.id;
    const label = button.firstChild ? button.firstChild.textContent : "";
    const actions = {
      days: () => { days = Number(button.dataset.days); return load(days); },
      restore: () => restore(id, label),
      delete: () => remove(id, label),
      download: () => download(id),
      trigger: () => trigger(),
    };
    const run = actions[button.dataset.action];
    if (run) run().catch((e) => { if (!(e instanceof Refused)) say(String(e), true); });
  });

  signin.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY, value);
    $("token").value = "";
    say("", false);
    load();
  });
  $("signout").addEventListener("click", () => signOut(""));

  if (token()) load(); else signOut("");
})();
