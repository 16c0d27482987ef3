"use strict";
// Memory banks: the list of a project's banks with their fill.
(() => {
  const { api, element, row, number, failed } = Eidetic;

  async function load() {
    const found = await api("/v1/memory-banks");
    document.querySelector("#banks-table tbody").replaceChildren(...found.banks.map((bank) => {
      const fill = element("span", null, { class: "fill", title: `${bank.size} of ${bank.capacity}` });
      const bar = element("span");
      bar.style.width = `${Math.min(100, (100 * bank.size) / bank.capacity)}%`;
      fill.append(bar);
      const cell = element("span");
      cell.append(fill, ` ${number(bank.size)} / ${number(bank.capacity)}`);
      const tr = row([element("a", bank.name, { href: `/ui/banks/${bank.id}` }), { text: bank.dim, numeric: true },
        { text: bank.metric }, { text: bank.policy }, { text: number(bank.version), numeric: true }, cell]);
      tr.dataset.bankId = bank.id;
      return tr;
    }));
    document.getElementById("bank-count").textContent = `${found.banks.length} bank${found.banks.length === 1 ? "" : "s"}`;
  }
  load().catch(failed);
})();
