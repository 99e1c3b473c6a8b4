// dhs inspect: keyboard grading. A/B/C/X save the grade (and the notes) with one POST, then open the next candidate.
(() => {
  const d = document.body.dataset;
  const notes = document.getElementById('notes');
  const status = document.getElementById('status');
  const go = url => { if (url) window.location.href = url; };

  async function grade(g) {
    const r = await fetch(d.gradeUrl, {method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({task_id: d.taskId, grade: g, notes: notes ? notes.value : '', grader: d.grader})});
    const j = await r.json().catch(() => ({error: r.statusText}));
    if (!r.ok) { status.textContent = `not saved: ${j.error}`; status.classList.add('error'); return false; }
    d.grade = g;
    document.querySelectorAll('#grades button').forEach(b => b.classList.toggle('on', b.dataset.grade === g));
    document.getElementById('n-graded').textContent = j.graded;
    status.textContent = `saved ${g} (version ${j.version})`;
    return true;
  }

  document.addEventListener('keydown', async e => {
    if (e.target.matches('textarea, input')) { if (e.key === 'Escape') e.target.blur(); return; }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key.length === 1 ? e.key.toUpperCase() : e.key;
    if (k === 'G') { e.preventDefault(); go(d.grid); return; }
    if (!d.taskId) return;
    if ('ABCX'.includes(k) && k.length === 1) { e.preventDefault(); if (await grade(k)) go(d.next || d.grid); }
    else if (k === 'ArrowRight') go(d.next);
    else if (k === 'ArrowLeft') go(d.prev);
    else if (k === 'N') { e.preventDefault(); notes.focus(); }
  });

  document.querySelectorAll('#grades button').forEach(b => b.addEventListener('click', async () => {
    if (await grade(b.dataset.grade)) go(d.next || d.grid);
  }));
  // notes edited after grading: saved as a new version of the same grade
  if (notes) notes.addEventListener('change', () => { if (d.grade) grade(d.grade); });
  d.ready = '1';   // the keys are bound (a test or a script driving the page waits for this)
})();
