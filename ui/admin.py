"""The admin tab of the annotation page: its components (``AdminTab``) and actions (``Admin``): the statistics
report and the export. Every action checks the role on the server; hiding the tab is only cosmetic."""

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from data.store import AnnotationError, AnnotationStore
from ui.render import stats_markdown


@dataclass
class AdminTab:
    tab: Any
    round_pick: Any
    refresh: Any
    stats: Any
    policy: Any
    export_btn: Any
    export_status: Any
    export_file: Any


@dataclass
class Admin:
    """The admin tab's actions; each checks the role on the server (hiding the tab is only cosmetic)."""

    store: AnnotationStore
    tab: AdminTab
    round: int | None
    export_dir: Path
    downloads: Path  # the admin's download copies: one at a time

    def admin(self, request: gr.Request) -> str:
        name = getattr(request, "username", None)
        if not name:
            raise gr.Error("Not logged in.")
        info = self.store.user(name)
        if info is None or not info.is_admin or not info.active:
            raise gr.Error("Admins only.")
        return name

    def picked(self, selected: str | None) -> int | None:
        if self.round is not None:
            return self.round
        if selected in (None, "", "all"):
            return None
        try:
            return int(selected)
        except ValueError:
            raise gr.Error(f"Unknown round {selected!r}.") from None

    def on_stats(self, request: gr.Request, selected: str | None) -> tuple:
        self.admin(request)
        r = self.picked(selected)
        choices = ["all"] + [str(x) for x in self.store.rounds()]
        return stats_markdown(self.store.stats(r)), gr.Dropdown(choices=choices, value="all" if r is None else str(r))

    def on_export(self, request: gr.Request, selected: str | None, policy: str) -> tuple:
        name = self.admin(request)
        r = self.picked(selected)
        if r is None:
            raise gr.Error("Pick a round to export.")
        try:
            res = self.store.export(r, out_dir=self.export_dir, policy=policy, by=name)
        except AnnotationError as exc:
            raise gr.Error(str(exc)) from None
        msg = (f"Wrote **{res.records}** comparisons (round {res.round}, version {res.version}, policy {res.policy}) to "
               f"`{res.path}`; {res.ties_dropped} ties dropped.")
        # The export folder is never served (anyone logged in could fetch it by path): the admin's download is
        # a copy that gradio moves into its cache under a content-hash URL only this response names.
        for old in self.downloads.iterdir():  # gradio has moved the earlier copy into its cache (cleared hourly)
            old.unlink(missing_ok=True)
        copy = self.downloads / Path(res.path).name
        shutil.copyfile(res.path, copy)
        return msg, str(copy)
