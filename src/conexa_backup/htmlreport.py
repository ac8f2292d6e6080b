"""The periodic report as one self-contained HTML file (issue 16): ``report --html FILE``.

The same facts as the text report (:func:`conexa_backup.actions.monitor.report`) and the
charts of :mod:`conexa_backup.actions.history`, for people who would rather look than read:
the RPO and RTO each said in one sentence at the top, then backups, drills, gaps and storage,
each with its chart and table. Everything is inline (CSS, SVG): the file opens anywhere, with
no network and no script. States are said in words and symbols, never by colour alone.
English or Portuguese (``lang``), the school's staff reading Portuguese.
"""

from __future__ import annotations

from html import escape
from typing import Any, Final

from conexa_backup.actions.history import History
from conexa_backup.actions.monitor import parse_time
from conexa_backup.charts import ENGLISH, STYLE, Series, Unit, Words, fmt, responsive_chart

LANGS: Final = ("en", "pt")
_TEXT: Final[dict[str, dict[str, str]]] = {
    "title": {"en": "Backup report", "pt": "Relatório de cópias de segurança"},
    "period": {"en": "{start} to {end} ({days} days)", "pt": "{start} a {end} ({days} dias)"},
    "rpo_met": {"en": "Every gap between backups stayed under the objective of {objective} "
                      "(the largest: {gap}).",
                "pt": "Todos os intervalos entre cópias ficaram abaixo do objetivo de "
                      "{objective} (o maior: {gap})."},
    "rpo_missed": {"en": "The largest gap between backups was {gap}, over the objective "
                         "of {objective}.",
                   "pt": "O maior intervalo entre cópias foi de {gap}, acima do objetivo de "
                         "{objective}."},
    "rpo_none": {"en": "No complete backup in this period (objective: one every {objective}).",
                 "pt": "Nenhuma cópia completa neste período (objetivo: uma a cada "
                       "{objective})."},
    "rto_met": {"en": "The drill of {when} restored everything in {took} (objective "
                      "{objective}).",
                "pt": "O teste de {when} restaurou tudo em {took} (objetivo {objective})."},
    "rto_slow": {"en": "The drill of {when} restored everything in {took}, over the "
                       "objective of {objective}.",
                 "pt": "O teste de {when} restaurou tudo em {took}, acima do objetivo de "
                       "{objective}."},
    "rto_failed": {"en": "The drill of {when} FAILED.", "pt": "O teste de {when} FALHOU."},
    "rto_none": {"en": "No restore drill ran in this period (objective: recovery within "
                       "{objective}).",
                 "pt": "Nenhum teste de restauração neste período (objetivo: recuperar em "
                       "até {objective})."},
    "ok": {"en": "OK", "pt": "OK"},
    "not_met": {"en": "NOT MET", "pt": "NÃO ATINGIDO"},
    "backups": {"en": "Backups", "pt": "Cópias de segurança"},
    "runs": {"en": "Runs: {runs}; complete: {success}, partial: {partial}, failed: {failure}.",
             "pt": "Execuções: {runs}; completas: {success}, parciais: {partial}, com falha: "
                   "{failure}."},
    "size": {"en": "Backup size", "pt": "Tamanho das cópias"},
    "duration": {"en": "Backup duration", "pt": "Duração das cópias"},
    "failures": {"en": "Failed runs", "pt": "Execuções com falha"},
    "time": {"en": "Time", "pt": "Horário"},
    "error": {"en": "Error", "pt": "Erro"},
    "drills": {"en": "Restore drills", "pt": "Testes de restauração"},
    "drill_runs": {"en": "Drills: {runs}; passed: {passed}, failed: {failed}.",
                   "pt": "Testes: {runs}; aprovados: {passed}, com falha: {failed}."},
    "recovery": {"en": "Drill recovery time", "pt": "Tempo de recuperação nos testes"},
    "gaps": {"en": "Gaps between backups", "pt": "Intervalos entre cópias"},
    "storage": {"en": "Storage", "pt": "Armazenamento"},
    "target": {"en": "Target", "pt": "Destino"},
    "stored": {"en": "Stored", "pt": "Armazenado"},
    "cost": {"en": "Cost a month", "pt": "Custo por mês"},
    "unreachable": {"en": "could not be listed: {why}", "pt": "não pôde ser listado: {why}"},
    "damaged": {"en": "Damaged copies", "pt": "Cópias danificadas"},
    "rto_line": {"en": "RTO {objective}", "pt": "RTO {objective}"},
    "series_database": {"en": "database (dump)", "pt": "banco de dados (dump)"},
    "series_uploads": {"en": "uploads (files)", "pt": "arquivos enviados"},
    "series_backup": {"en": "backup", "pt": "cópia"},
    "series_drill": {"en": "drill", "pt": "teste"},
    "series_gap": {"en": "gap between backups", "pt": "intervalo entre cópias"},
    "no_data": {"en": "No data in this period", "pt": "Sem dados neste período"},
    "failed": {"en": "failed", "pt": "falhou"},
    "rpo_line": {"en": "RPO {objective}", "pt": "RPO {objective}"},
}
_WORDS: Final = {
    "en": ENGLISH,
    "pt": Words(no_data=_TEXT["no_data"]["pt"], failed=_TEXT["failed"]["pt"], days="dias",
                months=("jan", "fev", "mar", "abr", "mai", "jun", "jul", "ago", "set", "out",
                        "nov", "dez"),
                points="{name}: {count} pontos, de {low} a {high}",
                failed_count=", {count} com falha", nothing="{name}: sem dados.",
                objective="Objetivo: {what}."),
}
_STYLE: Final = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1b1b1b; background: #fff; }
main { max-width: 720px; margin: 0 auto; padding: 16px; }
h1 { font-size: 1.5rem; margin: 0 0 4px; } h2 { font-size: 1.2rem; margin: 28px 0 8px; }
.period { color: #555; margin: 0 0 16px; }
.verdict { padding: 10px 12px; border-left: 6px solid; margin: 8px 0; }
.verdict.ok { border-color: #1f7a3a; background: #eef7f0; }
.verdict.bad { border-color: #b00020; background: #fbeef0; }
.verdict strong { margin-right: 6px; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #ddd; }
th.num, td.num { text-align: right; }
figure { margin: 12px 0; }
figcaption { font-weight: 600; margin-bottom: 4px; }
"""


def _t(lang: str, key: str, **values: object) -> str:
    return _TEXT[key][lang].format(**values)


def duration(seconds: float, lang: str) -> str:
    """``seconds`` as a person reads it in ``lang``: ``4 min 12 s``, ``4.2 dias``."""
    return fmt(seconds, Unit.SECONDS, _WORDS[lang])


def when(text: str | None, lang: str) -> str:
    """A recorded ISO time as a short day and hour (UTC)."""
    at = parse_time(text) if text else None
    if at is None:
        return "-"
    return f"{at.day} {_WORDS[lang].months[at.month - 1]} {at.year}, {at:%H:%M} UTC"


Verdict = tuple[str, bool, str]  # ("RPO" or "RTO", met, the sentence)


def _mark(ok: bool, lang: str) -> str:
    return f"✓ {_t(lang, 'ok')}" if ok else f"✗ {_t(lang, 'not_met')}"


def _verdict(v: Verdict, lang: str) -> str:
    label, ok, sentence = v
    return (f'<p class="verdict {"ok" if ok else "bad"}"><strong>{label} {_mark(ok, lang)}'
            f"</strong>{escape(sentence)}</p>")


def verdicts(r: dict[str, Any], lang: str = "en") -> list[Verdict]:
    """Whether the RPO and the RTO were met, each with its sentence."""
    return [_rpo(r, lang), _rto(r, lang)]


def summary(r: dict[str, Any], lang: str = "en") -> str:
    """The report in four lines, for chat (Slack): the verdicts, the runs, the drills."""
    lines = [f"{label} {_mark(ok, lang)}: {sentence}"
             for label, ok, sentence in verdicts(r, lang)]
    d = r["drills"]
    lines += [_t(lang, "runs", **r["backups"]),
              _t(lang, "drill_runs", runs=d["runs"], passed=d["passed"], failed=d["failed"])]
    return "\n".join(lines)


def _rpo(r: dict[str, Any], lang: str) -> Verdict:
    rpo = r["rpo"]
    objective = duration(rpo["objective_seconds"], lang)
    gap = rpo["largest_gap_seconds"]
    if gap is None:
        sentence = _t(lang, "rpo_none", objective=objective)
    else:
        key = "rpo_met" if rpo["met"] else "rpo_missed"
        sentence = _t(lang, key, objective=objective, gap=duration(gap, lang))
    return "RPO", bool(rpo["met"]), sentence


def _rto(r: dict[str, Any], lang: str) -> Verdict:
    """The report's own verdict (:func:`monitor.rto_verdict`: the newest drill), in words."""
    rto = r["rto"]
    objective = duration(rto["objective_seconds"], lang)
    last = rto.get("last_drill")
    if not last:
        return "RTO", False, _t(lang, "rto_none", objective=objective)
    day = when(last["at"], lang)
    if not last["ok"]:
        return "RTO", False, _t(lang, "rto_failed", when=day)
    key = "rto_met" if rto["met"] else "rto_slow"
    return "RTO", bool(rto["met"]), _t(lang, key, when=day,
                                       took=duration(last["recovery_seconds"], lang),
                                       objective=objective)


def _table(head: list[str], rows: list[list[str]], numeric: frozenset[int] = frozenset()) -> str:
    """A table of already escaped cells (columns in ``numeric`` aligned right)."""
    cells = "".join(f'<th class="num">{h}</th>' if i in numeric else f"<th>{h}</th>"
                    for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(
        f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
        for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _figure(caption: str, chart: str) -> str:
    return f"<figure><figcaption>{escape(caption)}</figcaption>{chart}</figure>"


def charts(hist: History, lang: str) -> dict[str, str]:
    """The four charts of ``hist`` as captioned figures, by key (``size``, ``duration``,
    ``recovery``: against the RTO, ``gaps``: against the RPO), in ``lang``: what the report
    and the status page both draw."""
    said = _WORDS[lang]
    rto = _t(lang, "rto_line", objective=duration(hist.rto_seconds, lang))
    rpo = _t(lang, "rpo_line", objective=duration(hist.rpo_seconds, lang))

    def chart(key: str, series: list[Series], unit: Unit, objective: float | None = None,
              line: str = "") -> str:
        title = _t(lang, key)
        named = [Series(_t(lang, f"series_{s.name}"), s.points) for s in series]
        return _figure(title, responsive_chart(
            title, named, unit=unit, start=hist.start, end=hist.end, chart_id=key,
            objective=objective, objective_label=line, words=said))

    return {"size": chart("size", hist.sizes, Unit.BYTES),
            "duration": chart("duration", hist.durations, Unit.SECONDS),
            "recovery": chart("recovery", hist.recovery, Unit.SECONDS, hist.rto_seconds, rto),
            "gaps": chart("gaps", hist.gaps, Unit.SECONDS, hist.rpo_seconds, rpo)}


def report_html(r: dict[str, Any], hist: History, lang: str = "en") -> str:
    """The report ``r`` (:func:`monitor.report`) and its period's charts as an HTML page.

    Raises:
        ValueError: ``lang`` is not one of :data:`LANGS`.
    """
    if lang not in LANGS:
        raise ValueError(f"report language {lang!r}: use one of {', '.join(LANGS)}")
    b, d = r["backups"], r["drills"]

    figures = charts(hist, lang)

    parts = [
        f"<h1>{escape(_t(lang, 'title'))}</h1>",
        f'<p class="period">{escape(_t(lang, "period", start=when(r["from"], lang), end=when(r["to"], lang), days=r["period_days"]))}</p>',  # noqa: E501
        *(_verdict(v, lang) for v in verdicts(r, lang)),
        f"<h2>{escape(_t(lang, 'backups'))}</h2>",
        f"<p>{escape(_t(lang, 'runs', **b))}</p>",
        figures["size"],
        figures["duration"],
    ]
    if b["failures"]:
        parts += [f"<h3>{escape(_t(lang, 'failures'))}</h3>", _table(
            [escape(_t(lang, "time")), escape(_t(lang, "error"))],
            [[escape(when(f["time"], lang)), escape(str(f["error"] or ""))]
             for f in b["failures"]])]
    parts += [
        f"<h2>{escape(_t(lang, 'drills'))}</h2>",
        f"<p>{escape(_t(lang, 'drill_runs', runs=d['runs'], passed=d['passed'], failed=d['failed']))}</p>",  # noqa: E501
        figures["recovery"],
        figures["gaps"],
        f"<h2>{escape(_t(lang, 'storage'))}</h2>",
        _table([escape(_t(lang, k)) for k in ("target", "stored", "cost")], [
            [escape(s["target"]) + (" — " + escape(_t(lang, "unreachable",
                                                      why=s["unreachable"]))
                                    if s["unreachable"] else ""),
             escape(fmt(s["bytes"], Unit.BYTES)),
             escape(f"{r['currency']} {s['monthly_cost']:.2f}")
             if s["monthly_cost"] is not None else "-"] for s in r["storage"]],
            numeric=frozenset({1, 2})),
    ]
    if r.get("damaged"):
        parts += [f"<h2>{escape(_t(lang, 'damaged'))}</h2>", "<ul>" + "".join(
            f"<li>{escape(x['id'])} ({escape(x['target'])}): {escape(str(x['why']))}</li>"
            for x in r["damaged"]) + "</ul>"]
    return ("<!doctype html>\n"
            f'<html lang="{lang}"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(_t(lang, 'title'))}</title>"
            f"<style>{_STYLE}{STYLE}</style></head>\n"
            "<body><main>\n" + "\n".join(parts) + "\n</main></body></html>\n")
