/**
 * Charts as self-contained SVG, rendered headless with vega-lite -> vega (no canvas, no network).
 */
import * as vega from 'vega';
import * as vl from 'vega-lite';

export interface LineSeries {
  name: string;
  points: { x: number; y: number }[];
}

/** A line chart with one line per series (points marked); `ordinalX` spaces the x values evenly (e.g. tree budgets 4, 8, 16, ...). */
export async function lineChartSvg(o: { title: string; xTitle: string; yTitle: string; series: LineSeries[]; ordinalX?: boolean; width?: number; height?: number }): Promise<string> {
  const values = o.series.flatMap((s) => s.points.map((p) => ({ x: p.x, y: p.y, series: s.name })));
  const spec: vl.TopLevelSpec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: o.title,
    width: o.width ?? 420,
    height: o.height ?? 220,
    data: { values },
    mark: { type: 'line', point: true },
    encoding: {
      x: o.ordinalX ? { field: 'x', type: 'ordinal', title: o.xTitle, axis: { labelAngle: 0 } } : { field: 'x', type: 'quantitative', title: o.xTitle },
      y: { field: 'y', type: 'quantitative', title: o.yTitle, scale: { zero: false } },
      color: { field: 'series', type: 'nominal', title: null, legend: { labelLimit: 400 } },
    },
  };
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}
