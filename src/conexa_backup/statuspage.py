"""The status page of ``conexa-backup serve`` (issue 16), rendered on the server; no web imports.

Two pieces. :func:`shell` is the page itself (``GET /``): it holds no facts, only the
sign-in form, the dialogs and the script (``page.js``, shipped in the package) that keeps the
token in ``sessionStorage`` and fetches :func:`view` with it. :func:`view` is every fact the
page shows, as HTML (``GET /api/admin/page``): the overall state as ``status`` says it, each
target's newest backup and last drill against the objectives, the backups with one cell per
target, and the report's charts (server-drawn SVG: no script draws them). Action buttons are
rendered only for a caller whose role may use them; the API checks the role again.

Every value is escaped here; states are said in words and symbols, never by colour alone.
English or Portuguese (:func:`choose_lang` reads ``Accept-Language``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any, Final

from conexa_backup.actions.history import History
from conexa_backup.actions.monitor import drill_failure, parse_time
from conexa_backup.charts import STYLE as CHART_STYLE
from conexa_backup.charts import Unit, fmt
from conexa_backup.htmlreport import LANGS, charts, duration, when

PERIODS: Final = (30, 90, 365)  # days the charts can show
_TEXT: Final[dict[str, tuple[str, str]]] = {  # key: (English, Portuguese)
    "title": ("Backups", "Cópias de segurança"),
    "signin": ("Sign in", "Entrar"),
    "token": ("Access token (the same as the API's)", "Token de acesso (o mesmo da API)"),
    "signin_help": ("The token is kept only in this browser tab until it is closed.",
                    "O token fica guardado só nesta aba do navegador, até ela ser fechada."),
    "signout": ("Sign out", "Sair"),
    "expired": ("Your token was refused or has expired: sign in again.",
                "Seu token foi recusado ou expirou: entre novamente."),
    "noscript": ("This page needs JavaScript to sign in; `conexa-backup status` and "
                 "`report --html` show the same facts.",
                 "Esta página precisa de JavaScript para entrar; `conexa-backup status` e "
                 "`report --html` mostram os mesmos dados."),
    "loading": ("Loading…", "Carregando…"),
    "state_OK": ("✓ OK", "✓ OK"), "state_WARNING": ("! WARNING", "! ATENÇÃO"),
    "state_CRITICAL": ("✗ CRITICAL", "✗ CRÍTICO"), "state_UNKNOWN": ("? UNKNOWN", "? DESCONHECIDO"),
    "listed_at": ("Targets listed at {at}.", "Destinos listados em {at}."),
    "targets": ("Targets", "Destinos"),
    "target": ("Target", "Destino"),
    "newest": ("Newest complete backup", "Cópia completa mais recente"),
    "age": ("{age} ago (objective: under {objective})",
            "há {age} (objetivo: menos de {objective})"),
    "state": ("State", "Estado"),
    "last_drill": ("Last restore drill", "Último teste de restauração"),
    "drill_ok": ("✓ passed {when}: recovered in {took} (objective {objective})",
                 "✓ aprovado em {when}: recuperado em {took} (objetivo {objective})"),
    "drill_slow": ("✗ passed {when} but took {took}, over the objective of {objective}",
                   "✗ aprovado em {when}, mas levou {took}, acima do objetivo de {objective}"),
    "drill_failed": ("✗ FAILED {when}: {why}", "✗ FALHOU em {when}: {why}"),
    "damaged": ("Damaged copies", "Cópias danificadas"),
    "none": ("none", "nenhuma"), "never": ("never", "nunca"),
    "running": ("Running now: {kind} {id} ({state}).", "Em execução: {kind} {id} ({state})."),
    "backups": ("Backups", "Cópias"),
    "shown": ("{shown} of {total} backups: those of the last {days} days.",
              "{shown} de {total} cópias: as dos últimos {days} dias."),
    "id": ("Backup", "Cópia"), "created": ("Created (UTC)", "Criada (UTC)"),
    "kind": ("Kind", "Tipo"),
    "size": ("Size", "Tamanho"), "checks": ("Checks", "Verificações"),
    "actions": ("Actions", "Ações"),
    "cell_complete": ("✓ complete", "✓ completa"), "cell_damaged": ("✗ damaged", "✗ danificada"),
    "cell_incomplete": ("◐ incomplete", "◐ incompleta"), "cell_missing": ("- missing", "- ausente"),
    "cell_policy": ("○ not sent (policy)", "○ não enviada (política)"),
    "verified": ("✓ verified {when}", "✓ verificada em {when}"),
    "verified_at": ("verified at {when}", "verificada em {when}"),
    "drilled": ("✓ drill passed", "✓ teste aprovado"),
    "unchecked": ("not verified yet", "ainda não verificada"),
    "drill_bad": ("✗ drill failed", "✗ teste falhou"),
    "download": ("Download", "Baixar"), "restore": ("Restore", "Restaurar"),
    "delete": ("Delete", "Excluir"), "trigger": ("Back up now", "Fazer cópia agora"),
    "charts": ("History", "Histórico"),
    "period": ("Period", "Período"), "days": ("{days} days", "{days} dias"),
    "no_backups": ("No backup in this period.", "Nenhuma cópia neste período."),
    "scheduled": ("scheduled", "agendada"), "manual": ("manual", "manual"),
    "safety": ("safety", "segurança"),
    "cancel_word": ("Cancel", "Cancelar"), "close_word": ("Close", "Fechar"),
}
# What page.js says, in the page's language (a JSON block in the page: data, never code).
_SCRIPT_WORDS: Final[dict[str, tuple[str, str]]] = {
    "expired": _TEXT["expired"],
    "confirm_restore": ("Restore backup {id}? The live database and uploads are replaced "
                        "(a safety backup of them is taken first).",
                        "Restaurar a cópia {id}? O banco de dados e os arquivos atuais serão "
                        "substituídos (uma cópia de segurança deles é feita antes)."),
    "confirm_delete": ("Delete backup {id} from every target? This cannot be undone.",
                       "Excluir a cópia {id} de todos os destinos? Isto não pode ser desfeito."),
    "type_id": ("Type the backup id to confirm: {id}", "Digite o id da cópia para confirmar: {id}"),
    "files": ("Files of backup {id}", "Arquivos da cópia {id}"),
    "job": ("{kind} {id}: {state}", "{kind} {id}: {state}"),
    "deleted": ("Backup {id} deleted from: {targets}.", "Cópia {id} excluída de: {targets}."),
    "downloading": ("Downloading {name}…", "Baixando {name}…"),
    "downloaded": ("{name} downloaded.", "{name} baixado."),
    "failed": ("Failed: {why}", "Falhou: {why}"),
    "backup": ("Backup", "Cópia"), "restore": ("Restore", "Restauração"),
    "queued": ("queued", "na fila"), "running": ("running", "em execução"),
    "succeeded": ("succeeded", "concluída"), "partial": ("partly done", "parcial"),
    "canceled": ("canceled", "cancelada"), "failed_state": ("FAILED", "FALHOU"),
}
_STYLE: Final = """
*, *::before, *::after { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 0; color: #1b1b1b; background: #fff; }
header { display: flex; align-items: center; justify-content: space-between; gap: 8px;
  flex-wrap: wrap; padding: 12px 16px; border-bottom: 1px solid #ddd; }
header h1 { font-size: 1.4rem; margin: 0; }
main { max-width: 1240px; margin: 0 auto; padding: 16px; }
h2 { font-size: 1.2rem; margin: 28px 0 8px; }
button { font: inherit; padding: 6px 12px; border: 1px solid #555; border-radius: 4px;
  background: #f4f4f4; color: #1b1b1b; cursor: pointer; min-height: 36px; }
button:hover { background: #e8e8e8; }
button:disabled { opacity: 0.5; cursor: not-allowed; }
button.danger { border-color: #b00020; color: #8a0019; }
button[aria-pressed="true"] { background: #1f5fa8; color: #fff; border-color: #1f5fa8; }
:focus-visible { outline: 3px solid #1f5fa8; outline-offset: 2px; }
input { font: inherit; padding: 6px 8px; width: 100%; max-width: 32rem; }
label { display: block; font-weight: 600; margin: 8px 0 4px; }
.banner { padding: 12px 14px; border-left: 8px solid; margin: 0 0 8px; font-size: 1.1rem;
  overflow-wrap: anywhere; }
.note, li, small { overflow-wrap: anywhere; }
.banner strong { margin-right: 8px; }
.s-OK { border-color: #1f7a3a; background: #eef7f0; }
.s-WARNING { border-color: #b26b00; background: #fdf4e6; }
.s-CRITICAL { border-color: #b00020; background: #fbeef0; }
.s-UNKNOWN { border-color: #555; background: #f2f2f2; }
.muted { color: #555; }
.scroll { overflow-x: auto; position: relative; }  /* holds .sr-only inside it */
table { border-collapse: collapse; width: 100%; font-size: 0.92rem; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #ddd; vertical-align: top; }
th.num, td.num { text-align: right; white-space: nowrap; }
td.id { font-family: ui-monospace, monospace; white-space: nowrap; }
.bad { color: #8a0019; } .warn { color: #7a4a00; } .good { color: #1a6631; }
.badge { display: inline-block; margin: 0 4px 2px 0; white-space: nowrap; }
.actions { display: flex; gap: 4px; }
td.when, td[data-cell] { white-space: nowrap; }
td[data-cell] details[open] { white-space: normal; min-width: 16rem; }
summary { cursor: pointer; }
.periods { display: flex; gap: 6px; flex-wrap: wrap; margin: 0 0 8px; }
.charts { display: grid; gap: 8px 24px;
  grid-template-columns: repeat(auto-fit, minmax(min(100%, 500px), 1fr)); }
figure { margin: 12px 0; min-width: 0; } figcaption { font-weight: 600; margin-bottom: 4px; }
.note { min-height: 1.5em; margin: 8px 0; } .note.bad { font-weight: 600; }
#job { padding: 8px 12px; border: 1px solid #1f5fa8; margin: 8px 0; }
#job progress { width: 100%; max-width: 32rem; display: block; }
dialog { max-width: min(40rem, 94vw); border: 1px solid #555; border-radius: 6px; }
dialog::backdrop { background: rgb(0 0 0 / 40%); }
dialog menu { display: flex; gap: 8px; padding: 0; margin: 16px 0 0; flex-wrap: wrap; }
dialog ul { padding-left: 1.2rem; } dialog li { margin: 6px 0; }
.sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
@media (max-width: 600px) {
  main { padding: 8px; }
  table.cards thead { position: absolute; width: 1px; height: 1px; overflow: hidden;
    clip: rect(0 0 0 0); }
  table.cards, table.cards tbody, table.cards tr, table.cards td,
  table.cards th[scope="row"] { display: block; width: 100%; }
  table.cards tr { border: 1px solid #ccc; border-radius: 6px; margin: 0 0 10px;
    padding: 4px 8px; }
  table.cards td, table.cards th[scope="row"] { border: none; padding: 3px 0;
    text-align: left; white-space: normal; }
  table.cards td[data-label]::before { content: attr(data-label) ": "; font-weight: 600; }
}
"""


def t(lang: str, key: str, **values: object) -> str:
    """The page's text ``key`` in ``lang``, with ``values`` filled in (not escaped)."""
    return _TEXT[key][LANGS.index(lang)].format(**values)


def _e(lang: str, key: str, **values: object) -> str:
    return escape(t(lang, key, **values))


def choose_lang(accept_language: str | None, asked: str | None = None) -> str:
    """``asked`` when it is a known language, else the first of ``Accept-Language``'s
    (by its ``q`` weights) that the page speaks (``pt-BR`` is ``pt``), else English."""
    if asked in LANGS:
        return asked
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        weight = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        base = tag.strip().lower().split("-")[0]
        if base in LANGS and weight > 0:
            ranked.append((-weight, index, base))
    return min(ranked)[2] if ranked else "en"


def shell(lang: str) -> str:
    """The page (``GET /``): sign-in form, where the facts go, the dialogs, the script."""
    words = {k: v[LANGS.index(lang)] for k, v in _SCRIPT_WORDS.items()}
    # "</" cannot close the block early: escaped the way JSON allows.
    data = json.dumps(words, ensure_ascii=False).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>conexa-backup — {_e(lang, "title")}</title>
<style>{_STYLE}{CHART_STYLE}</style>
<script type="application/json" id="words">{data}</script>
<script src="/page.js" defer></script>
</head><body>
<header><h1>conexa-backup — {_e(lang, "title")}</h1>
<button type="button" id="signout" hidden>{_e(lang, "signout")}</button></header>
<main>
<noscript><p>{_e(lang, "noscript")}</p></noscript>
<p id="note" class="note" role="status" aria-live="polite"></p>
<form id="signin" hidden>
<h2>{_e(lang, "signin")}</h2>
<label for="token">{_e(lang, "token")}</label>
<input id="token" name="token" type="password" autocomplete="off" required>
<p class="muted">{_e(lang, "signin_help")}</p>
<button type="submit">{_e(lang, "signin")}</button>
</form>
<section id="job" role="status" aria-live="polite" hidden></section>
<div id="view" aria-busy="false"></div>
</main>
<dialog id="confirm" aria-labelledby="confirm-text"><form method="dialog">
<p id="confirm-text"></p>
<label for="confirm-id" id="confirm-label"></label>
<input id="confirm-id" autocomplete="off" spellcheck="false">
<menu><button type="button" value="cancel" id="confirm-cancel">✗ {_e(lang, "cancel_word")}</button>
<button type="submit" value="ok" id="confirm-ok" class="danger" disabled></button></menu>
</form></dialog>
<dialog id="files" aria-labelledby="files-title"><form method="dialog">
<h2 id="files-title"></h2><ul id="files-list"></ul>
<menu><button type="submit" value="close">{_e(lang, "close_word")}</button></menu>
</form></dialog>
</body></html>
"""


@dataclass(frozen=True)
class Facts:
    """What :func:`view` shows; gathered by the server from its list snapshot and
    ``state_dir`` (the same facts as ``status --json``, ``list --json`` and ``report``)."""

    status: Mapping[str, Any]  # status --json, plus running_job
    backups: Sequence[Mapping[str, Any]]  # list --json entries (server.listing.entry), newest first
    targets: Sequence[str]  # configured, in config order
    drills: Sequence[Mapping[str, Any]]  # recorded drills, oldest first
    history: History
    days: int
    max_backup_age_seconds: float
    not_sent: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # id -> target -> why
    can_admin: bool = False  # download, trigger
    can_restore: bool = False  # restore, delete


def view(f: Facts, lang: str) -> str:
    """Every fact the page shows, as an HTML fragment for ``#view``."""
    parts = [_banner(f.status, lang), _running(f.status.get("running_job"), lang),
             f"<h2>{_e(lang, 'targets')}</h2>", _targets(f, lang),
             _backups(f, lang), _charts(f, lang)]
    return "\n".join(p for p in parts if p)


def _banner(status: Mapping[str, Any], lang: str) -> str:
    level = str(status.get("status", "UNKNOWN"))
    if f"state_{level}" not in _TEXT:
        level = "UNKNOWN"
    listed = when(status.get("listed_at"), lang)
    return (f'<p class="banner s-{level}" id="state" data-state="{level}">'
            f"<strong>{_e(lang, 'state_' + level)}</strong>{escape(str(status.get('summary', '')))}"
            f"</p><p class=\"muted\">{_e(lang, 'listed_at', at=listed)}</p>")


def _running(job: Mapping[str, Any] | None, lang: str) -> str:
    if not job:
        return ""
    return (f'<p id="running" data-job="{escape(str(job.get("id", "")))}">'
            + _e(lang, "running", kind=job.get("kind", ""), id=job.get("backup_id") or "",
                 state=job.get("state", "")) + "</p>")


def _short(at: str) -> str:
    """``6 Dec 2026, 07:52 UTC`` as ``6 Dec 2026 07:52`` (the column says UTC)."""
    return at.replace(",", "").removesuffix(" UTC")


def _day(at: str) -> str:
    """``6 Dec 2026, 07:52 UTC`` as ``6 Dec`` (the full time is the badge's tooltip)."""
    return " ".join(at.split()[:2])


def _age(seconds: object, lang: str) -> str:
    return duration(float(seconds), lang) if isinstance(seconds, int | float) else ""


def _targets(f: Facts, lang: str) -> str:
    rows = []
    for t_ in f.status.get("targets", []):
        name = str(t_.get("target"))
        level = str(t_.get("status", "UNKNOWN"))
        newest = t_.get("newest_backup")
        age = t_.get("backup_age_seconds")
        if newest:
            # Each target's own limit (an archive tier is sent one backup a month).
            limit = t_.get("max_backup_age_seconds")
            limit = limit if isinstance(limit, int | float) else f.max_backup_age_seconds
            late = isinstance(age, int | float) and age > limit
            newest_cell = (f'<span class="{"bad" if late else "good"}">'
                           f'{"✗" if late else "✓"} {escape(str(newest))}</span><br>'
                           + _e(lang, "age", age=_age(age, lang),
                                objective=duration(limit, lang)))
        else:
            newest_cell = f'<span class="bad">✗ {_e(lang, "never")}</span>'
        damaged = t_.get("damaged") or []
        damaged_cell = (_e(lang, "none") if not damaged else '<ul class="bad">' + "".join(
            f"<li>✗ {escape(str(d.get('id')))}: {escape(str(d.get('why')))}</li>"
            for d in damaged) + "</ul>")
        state = _e(lang, f"state_{level}") if f"state_{level}" in _TEXT else escape(level)
        label = [_e(lang, k) for k in ("state", "newest", "last_drill", "damaged")]
        rows.append(f'<tr data-target="{escape(name)}"><th scope="row">{escape(name)}</th>'
                    + _td(label[0], state, f"s-{escape(level)}") + _td(label[1], newest_cell)
                    + _td(label[2], _drill_cell(f, name, lang)) + _td(label[3], damaged_cell)
                    + "</tr>")
    head = "".join(f'<th scope="col">{_e(lang, k)}</th>'
                   for k in ("target", "state", "newest", "last_drill", "damaged"))
    return _table("targets", _e(lang, "targets"), head, rows)


def _drill_cell(f: Facts, target: str, lang: str) -> str:
    mine = [(started, d) for d in f.drills if d.get("target") == target
            and (started := parse_time(d.get("started_at"))) is not None]
    if not mine:
        return f'<span class="bad">✗ {_e(lang, "never")}</span>'
    last = max(mine, key=lambda pair: pair[0])[1]  # the newest, whatever its outcome
    at = when(str(last.get("started_at")), lang)
    rto = f.history.rto_seconds
    took = float(last.get("recovery_seconds") or 0.0)
    if not last.get("ok"):
        why = drill_failure(dict(last))
        return f'<span class="bad">{_e(lang, "drill_failed", when=at, why=why)}</span>'
    key, css = ("drill_ok", "good") if took <= rto else ("drill_slow", "bad")
    return (f'<span class="{css}">' + _e(lang, key, when=at, took=duration(took, lang),
                                         objective=duration(rto, lang)) + "</span>")


def _table(table_id: str, label: str, head: str, rows: Sequence[str]) -> str:
    """A table in a box of its own that scrolls sideways when the table is wider than the
    screen (the page never does), focusable so the keyboard can scroll it; drawn as cards
    on a phone (see the style)."""
    return (f'<div class="scroll" role="region" aria-label="{label}" tabindex="0">'
            f'<table id="{table_id}" class="cards"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _td(label: str, content: str, css: str = "", attrs: str = "") -> str:
    """A cell; ``label`` (escaped) names its column where a narrow screen draws each row
    as a card (the column heads are not shown there)."""
    return (f'<td data-label="{label}"{f" class={chr(34)}{css}{chr(34)}" if css else ""}'
            f"{attrs}>{content}</td>")


def _cell(entry: Mapping[str, Any], target: str, f: Facts, lang: str) -> str:
    """One copy's state: complete, damaged (since when, why), incomplete, not sent because
    that target's retention skipped it, or missing."""
    label = escape(target)
    copy = next((c for c in entry.get("targets", []) if c.get("target") == target), None)
    if copy is None:
        why = f.not_sent.get(str(entry.get("id")), {}).get(target)
        if why is not None:
            return _td(label, _e(lang, "cell_policy"), "",
                       f' data-cell="policy" title="{escape(why)}"')
        return _td(label, _e(lang, "cell_missing"), "warn", ' data-cell="missing"')
    state = str(copy.get("state"))
    if state == "complete":
        return _td(label, _e(lang, "cell_complete"), "good", ' data-cell="complete"')
    if state == "damaged":
        why = escape(str(copy.get("why") or ""))
        return _td(label, f'<details><summary>{_e(lang, "cell_damaged")}</summary>'
                          f"<small>{why}</small></details>", "bad", ' data-cell="damaged"')
    return _td(label, _e(lang, "cell_incomplete"), "warn", ' data-cell="incomplete"')


def _checks(entry: Mapping[str, Any], lang: str) -> str:
    """Badges: the newest passed verification of any copy, and its drills' outcome."""
    badges = []
    verified = [str(c["verified_at"]) for c in entry.get("targets", []) if c.get("verified_at")]
    if verified:
        at = when(max(verified), lang)
        badges.append(f'<span class="badge good" title="{_e(lang, "verified_at", when=at)}">'
                      f'{_e(lang, "verified", when=_day(at))}</span>')
    drills = entry.get("drills") or {}
    if any(not d.get("ok") for d in drills.values()):
        badges.append(f'<span class="badge bad">{_e(lang, "drill_bad")}</span>')
    elif drills:
        badges.append(f'<span class="badge good">{_e(lang, "drilled")}</span>')
    return "".join(badges) or f'<span class="muted">{_e(lang, "unchecked")}</span>'


def _actions(entry: Mapping[str, Any], f: Facts, lang: str) -> str:
    bid = escape(str(entry.get("id")))
    good = entry.get("status") != "damaged" or bool(entry.get("location"))
    buttons = []
    if f.can_admin and good:
        buttons.append(f'<button type="button" data-action="download" data-id="{bid}">'
                       f'{_e(lang, "download")}<span class="sr-only"> {bid}</span></button>')
    if f.can_restore and good:
        buttons.append(f'<button type="button" data-action="restore" data-id="{bid}">'
                       f'{_e(lang, "restore")}<span class="sr-only"> {bid}</span></button>')
    if f.can_restore:
        buttons.append(f'<button type="button" class="danger" data-action="delete" '
                       f'data-id="{bid}">{_e(lang, "delete")}'
                       f'<span class="sr-only"> {bid}</span></button>')
    return _td(_e(lang, "actions"), f'<div class="actions">{"".join(buttons)}</div>')


def _backups(f: Facts, lang: str) -> str:
    start = f.history.start
    shown = [b for b in f.backups
             if (at := parse_time(b.get("created_at") or "")) is None or at >= start]
    actions = f.can_admin or f.can_restore
    heads = [_e(lang, "id"), _e(lang, "created"), _e(lang, "kind"), _e(lang, "size"),
             *(escape(t_) for t_ in f.targets), _e(lang, "checks")]
    if actions:
        heads.append(_e(lang, "actions"))
    head = "".join(f'<th scope="col"{" class=num" if h == _e(lang, "size") else ""}>{h}</th>'
                   for h in heads)
    rows = []
    for b in shown:
        kind = str(b.get("kind") or "")
        rows.append(
            f'<tr data-id="{escape(str(b.get("id")))}" data-state="{escape(str(b.get("state")))}">'
            + _td(heads[0], escape(str(b.get("id"))), "id")
            + _td(heads[1], escape(_short(when(b.get("created_at"), lang))), "when")
            + _td(heads[2], _e(lang, kind) if kind in _TEXT else escape(kind))
            + _td(heads[3], escape(fmt(float(b.get("size_bytes") or 0), Unit.BYTES)), "num")
            + "".join(_cell(b, t_, f, lang) for t_ in f.targets)
            + _td(_e(lang, "checks"), _checks(b, lang))
            + (_actions(b, f, lang) if actions else "")
            + "</tr>")
    trigger = (f'<p><button type="button" data-action="trigger">{_e(lang, "trigger")}</button></p>'
               if f.can_admin else "")
    table = (_table("backups", _e(lang, "backups"), head, rows) if rows
             else f"<p>{_e(lang, 'no_backups')}</p>")
    return (f"<h2>{_e(lang, 'backups')}</h2>{trigger}<p class=\"muted\">"
            + _e(lang, "shown", shown=len(shown), total=len(f.backups), days=f.days)
            + f"</p>{table}")


def _charts(f: Facts, lang: str) -> str:
    buttons = "".join(
        f'<button type="button" data-action="days" data-days="{d}" '
        f'aria-pressed="{"true" if d == f.days else "false"}">{_e(lang, "days", days=d)}</button>'
        for d in PERIODS)
    figures = charts(f.history, lang)
    return (f"<h2>{_e(lang, 'charts')}</h2>"
            f'<div class="periods" role="group" aria-label="{_e(lang, "period")}">{buttons}</div>'
            f'<div class="charts">{"".join(figures.values())}</div>')
