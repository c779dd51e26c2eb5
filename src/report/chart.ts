/**
 * Charts as self-contained SVG, rendered headless with vega-lite -> vega (no canvas, no network).
 *
 * A chart is built from long-form rows (one point each: x, y, the series it belongs to, and optionally a
 * dash group and a facet panel), so the same rows can be embedded beside the SVG as the chart's data.
 */
import * as vega from 'vega';
import * as vl from 'vega-lite';

export interface LineSeries {
  name: string;
  points: { x: number; y: number }[];
}

/** One plotted point. `y` null (a NaN in the source) leaves a gap. Extra fields ride along in the data. */
export interface ChartRow {
  x: number;
  y: number | null;
  /** The line it belongs to (colour). */
  series: string;
  /** Line style group (dash), e.g. train / eval. */
  dash?: string;
  /** Panel, when the chart is faceted. */
  facet?: string;
  [extra: string]: unknown;
}

export interface ChartOptions {
  title: string;
  xTitle: string;
  yTitle: string;
  rows: ChartRow[];
  /** Space the x values evenly (e.g. tree budgets 4, 8, 16, ...). */
  ordinalX?: boolean;
  /** x values are integers (steps): whole-number ticks only. */
  integerX?: boolean;
  /** Legend titles (null: none). */
  seriesTitle?: string | null;
  dashTitle?: string | null;
  /** Series are ordered (e.g. top-1 .. top-10): a sequential colour scheme instead of categories. */
  orderedSeries?: boolean;
  /** Panels per row when faceted (rows with `facet`). */
  facetColumns?: number;
  /** Each panel its own y scale (panels of different quantities). */
  independentY?: boolean;
  /** Start the y axis at zero (default: fit the data). */
  zeroY?: boolean;
  /** Size of the plot (of each panel when faceted), px. */
  width?: number;
  height?: number;
}

/** Distinct values in order of first appearance (vega would sort them as text: "head 10" before "head 2"). */
function firstSeen(values: (string | undefined)[]): string[] {
  return [...new Set(values.filter((v): v is string => v !== undefined))];
}

/** The vega-lite spec of a line chart over long-form rows (points marked, one line per series x dash x facet). */
export function chartSpec(o: ChartOptions): vl.TopLevelSpec {
  const series = firstSeen(o.rows.map((r) => r.series));
  const dashes = firstSeen(o.rows.map((r) => r.dash));
  const facets = firstSeen(o.rows.map((r) => r.facet));
  const encoding: Record<string, unknown> = {
    x: o.ordinalX
      ? { field: 'x', type: 'ordinal', title: o.xTitle, axis: { labelAngle: 0 } }
      : { field: 'x', type: 'quantitative', title: o.xTitle, ...(o.integerX ? { axis: { tickMinStep: 1, format: 'd' } } : {}) },
    y: { field: 'y', type: 'quantitative', title: o.yTitle, scale: { zero: o.zeroY ?? false } },
    color: {
      field: 'series', type: o.orderedSeries ? 'ordinal' : 'nominal', sort: series, title: o.seriesTitle ?? null,
      ...(o.orderedSeries ? { scale: { scheme: 'viridis' } } : {}), legend: series.length > 1 ? { labelLimit: 400 } : null,
    },
  };
  if (dashes.length > 0) encoding['strokeDash'] = { field: 'dash', type: 'nominal', sort: dashes, title: o.dashTitle ?? null };
  if (facets.length > 0) encoding['facet'] = { field: 'facet', type: 'nominal', sort: facets, columns: o.facetColumns ?? Math.min(facets.length, 3), title: null, header: { labelFontSize: 12 } };
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: o.title,
    width: o.width ?? 420,
    height: o.height ?? 220,
    data: { values: o.rows },
    mark: { type: 'line', point: true },
    encoding,
    ...(facets.length > 0 && o.independentY ? { resolve: { scale: { y: 'independent' } } } : {}),
  } as vl.TopLevelSpec;
}

/** Render a vega-lite spec to SVG text, headless. */
export async function specToSvg(spec: vl.TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/** A line chart over long-form rows, as SVG. */
export async function chartSvg(o: ChartOptions): Promise<string> {
  return specToSvg(chartSpec(o));
}

/** A line chart with one line per series (points marked); `ordinalX` spaces the x values evenly (e.g. tree budgets 4, 8, 16, ...). */
export async function lineChartSvg(o: { title: string; xTitle: string; yTitle: string; series: LineSeries[]; ordinalX?: boolean; width?: number; height?: number }): Promise<string> {
  const rows = o.series.flatMap((s) => s.points.map((p) => ({ x: p.x, y: p.y, series: s.name })));
  return chartSvg({ title: o.title, xTitle: o.xTitle, yTitle: o.yTitle, rows, ordinalX: o.ordinalX, width: o.width, height: o.height });
}
