"""The annotation page's CSS, keyboard shortcuts (JS) and the keys hint (static text)."""

CSS = """
.conv, .resp {font-size: 15px; line-height: 1.45;}
.turn {margin: 0 0 10px 0; padding: 8px 12px; border-radius: 8px; border: 1px solid var(--border-color-primary);}
.turn.user {background: var(--background-fill-secondary);}
.turn.final {border-width: 2px; border-color: var(--color-accent);}
.role {font-weight: 600; font-size: 12px; text-transform: uppercase; opacity: .7; margin-bottom: 4px;}
.text {white-space: pre-wrap; overflow-wrap: anywhere;}
.resp {padding: 10px 14px; border-radius: 8px; border: 1px solid var(--border-color-primary); min-height: 120px;}
.resp-head {font-weight: 700; font-size: 18px; margin-bottom: 6px;}
.empty {padding: 24px; text-align: center; font-size: 17px;}
.keys {font-size: 12px; opacity: .75;}
/* Fits a 1280x800 window: the prompt and the two responses scroll inside fixed-height panes (as in Label Studio and
   Argilla), the choice, strength and Submit stay on screen. */
#context {max-height: 15vh; overflow-y: auto;}
#left .resp, #right .resp {height: 30vh; min-height: 0; overflow-y: auto;}
#controls {position: sticky; bottom: 0; z-index: 20; background: var(--background-fill-primary);
           border-top: 1px solid var(--border-color-primary); padding-top: 4px;}
/* A phone: A and B stack with shorter panes; the controls are a bar fixed to the bottom of the screen (sticky does
   not hold inside Gradio's stacked columns) and the page leaves room to scroll everything above it. */
@media (max-width: 640px) {
  #left .resp, #right .resp {height: 22vh;}
  #context {max-height: 12vh;}
  #controls {position: fixed; left: 0; right: 0; bottom: 0; margin: 0; padding: 4px 8px; gap: 4px; max-height: 48vh;
             overflow-y: auto; box-shadow: 0 -2px 10px rgba(0, 0, 0, .18);}
  #controls .block {padding: 4px 8px;}
  body {padding-bottom: 50vh;}
}
/* No keyboard hint on touch screens. */
@media (hover: none) and (pointer: coarse) { .keys {display: none;} }
"""

# Keyboard shortcuts: click the same controls a mouse would (the radio inputs inside each group).
JS = r"""
() => {
  const pick = (id, value) => {
    const el = document.querySelector(`#${id} input[type=radio][value="${value}"]`);
    if (el) { el.click(); }
  };
  const click = (id) => { const b = document.getElementById(id); if (b && !b.disabled) { b.click(); } };
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    const typing = t && (t.tagName === 'TEXTAREA' || (t.tagName === 'INPUT' && t.type !== 'radio' && t.type !== 'checkbox'));
    if (typing) {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); click('submit-btn'); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) { return; }
    if (e.key === 'Enter' && t && t.tagName === 'BUTTON') {
      // Enter submits the label. On the focused Undo or Skip button (e.g. after clicking it) the browser
      // would press that button instead; other buttons (tabs, admin) keep their own Enter.
      if (t.id === 'undo-btn' || t.id === 'skip-btn') { e.preventDefault(); click('submit-btn'); }
      return;
    }
    const strengths = ['significantly_better', 'better', 'slightly_better', 'negligibly_better'];
    const k = e.key.toLowerCase();
    if (k === 'a' || k === 'b') { pick('choice', k.toUpperCase()); }
    else if (['1', '2', '3', '4'].includes(k)) { pick('strength', strengths[Number(k) - 1]); }
    else if (k === 'q') { pick('safe-a', 'safe'); }
    else if (k === 'w') { pick('safe-a', 'unsafe'); }
    else if (k === 'o') { pick('safe-b', 'safe'); }
    else if (k === 'p') { pick('safe-b', 'unsafe'); }
    else if (k === 'enter') { click('submit-btn'); }
    else if (k === 'u') { click('undo-btn'); }
    else { return; }
    e.preventDefault();
  });
}
"""

KEYS_HELP = ("Keys: <b>a</b>/<b>b</b> choose · <b>1</b>-<b>4</b> strength · <b>q</b>/<b>w</b> A safe/unsafe · "
             "<b>o</b>/<b>p</b> B safe/unsafe · <b>Enter</b> submit (Ctrl+Enter in the comment) · <b>u u</b> undo")
